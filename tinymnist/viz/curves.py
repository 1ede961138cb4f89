"""`plot -o curves.png`: train loss, test loss and test accuracy per epoch, via matplotlib.

One colour per run; a multi-model run is its mean line over a shaded min-max band, its
ensemble a dashed line. Both y axes are logarithmic (runs.py says why). matplotlib's object
API renders with Agg here, without pyplot: no global figure state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

from tinymnist.tool.extras import require
from tinymnist.tool.outputs import atomic_output
from tinymnist.viz.runs import ACCURACY_TICKS, QUANTITIES, TITLES, Run, on_log_axis

FIGURE_INCHES = (15, 4.8)  # three panels side by side, legend below
DPI = 100  # 1500 x 480 pixels
BAND_ALPHA = 0.2  # the min-max band, light enough to see the other runs through it


def write_curves_png(runs: list[Run], path: Path) -> None:
    """Draw the three panels for `runs` and write them to `path` atomically."""
    figure = curves_figure(runs)
    with atomic_output(path) as f:
        figure.savefig(f, format="png")


def curves_figure(runs: list[Run]):
    """A matplotlib Figure: train loss, test loss and test accuracy side by side, a legend below."""
    figure_module = require("matplotlib.figure", "plot -o")
    ticker = require("matplotlib.ticker", "plot -o")
    figure = figure_module.Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, len(QUANTITIES))
    colours = [f"C{i % 10}" for i in range(len(runs))]  # matplotlib's default cycle, by name
    for ax, quantity in zip(axes, QUANTITIES, strict=True):
        for run, colour in zip(runs, colours, strict=True):
            series = run.series.get(quantity)
            if series is None:
                continue
            style = "--" if run.ensemble else "-"
            values = [on_log_axis(quantity, v, run.total) for v in series.values]
            ax.plot(series.epochs, values, style, color=colour, marker="o", markersize=3, label=run.label)
            if series.low is not None:
                low, high = ([on_log_axis(quantity, v, run.total) for v in band] for band in (series.low, series.high))
                ax.fill_between(series.epochs, low, high, color=colour, alpha=BAND_ALPHA, lw=0)
        ax.set_title(TITLES[quantity])
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
        if quantity == "test_accuracy":
            accuracy_axis(ax, ticker)
        else:  # label 1-2-5 steps per decade, as plain numbers
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    handles, labels = axes[-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)
    return figure


def accuracy_axis(ax, ticker) -> None:
    """Error rates on a log scale, labelled as accuracies, 99% above 98%."""
    ax.invert_yaxis()
    low, high = sorted(ax.get_ylim())
    ticks = [1 - a for a in ACCURACY_TICKS if low <= 1 - a <= high]
    ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda error, _: f"{100 * (1 - error):g}%"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.set_ylabel("accuracy (log scale of the error rate)")
