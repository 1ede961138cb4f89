"""Read `--metrics` files (JSON Lines, one evaluation a line; epoch 0 is the untrained network)
into curves: one per run, per quantity, per epoch.

A multi-model run adds "seed" and "lr" to every line, and an `"ensemble": true` line per
evaluation. A file becomes one Run per learning rate (the mean over its seeds, min and max
as a band: a band across learning rates would mix experiments), one for the ensemble, and
one for lines without a seed (a plain run appended to a sweep's file, kept out of the mean).

Accuracy is plotted as an error rate on a log axis, labelled as accuracy: 98% and 99% are a
factor of 2 apart, as are 80% and 90%, so the last epochs stay readable beside the untrained 10%.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tinymnist.data import files
from tinymnist.errors import TinyMnistError

QUANTITIES = ("train_loss", "test_loss", "test_accuracy")
TITLES = {"train_loss": "train loss", "test_loss": "test loss", "test_accuracy": "test accuracy"}
EXACT_FLOAT_INTEGERS = 2**53  # beyond it a float64 epoch + 1 == epoch: no epoch axis can be drawn
MNIST_TEST_IMAGES = 10_000  # the test set size, for a file that does not record its own
# Accuracy ticks on the log error axis, as accuracies (error = 1 - accuracy).
ACCURACY_TICKS = (0.1, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)


@dataclass(frozen=True)
class Series:
    """One quantity of one run: a value per epoch; low/high the band over models (or None)."""

    epochs: tuple[int, ...]
    values: tuple[float, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Run:
    label: str  # the file's name, plus "lr=…", "(N seeds)" or "ensemble"
    series: dict[str, Series]  # quantity (QUANTITIES) -> its values; a quantity never logged is absent
    models: int = 1  # how many models the values are the mean of
    total: int | None = None  # test images per evaluation: the smallest error it can measure
    ensemble: bool = False  # the models' averaged probabilities, not one model


def on_log_axis(quantity: str, value: float, total: int | None) -> float:
    """The value the log axis shows: a loss as is; an accuracy as its error rate, kept above 0
    (a perfect score shows as half an error)."""
    if quantity == "test_accuracy":
        return max(1.0 - value, 0.5 / (total or MNIST_TEST_IMAGES))
    return value


def read_runs(paths: list[Path]) -> list[Run]:
    """Every run in the given metrics files, in the order given."""
    runs: list[Run] = []
    for path in paths:
        runs.extend(runs_of_file(path, read_records(path)))
    return runs


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics file, each checked for the keys a plot needs."""
    files.check_readable(path, "metrics file")
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise TinyMnistError(f"metrics file {path}: no such file") from None
    except UnicodeDecodeError:  # a checkpoint, a picture: plot reads the JSON lines `train --metrics` writes
        raise TinyMnistError(f"metrics file {path}: not text, so not a file `train --metrics` wrote") from None
    except OSError as e:
        raise TinyMnistError(f"metrics file {path}: cannot be read ({e})") from None
    lines = text.splitlines()
    records, cut_off = [], None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"metrics file {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):  # a run writing it now, or one stopped mid-line
                cut_off = where
                break
            raise TinyMnistError(f"{where}: not JSON ({e.msg}); is it a --metrics file?") from None
        except RecursionError:  # the parser recurses once per level: [[[[...]]]] 100,000 deep exhausts it
            raise TinyMnistError(f"{where}: nested too deeply to be a record; is it a --metrics file?") from None
        missing = {"epoch", "test_loss", "test_accuracy"} - set(record) if isinstance(record, dict) else {"epoch"}
        if missing:
            raise TinyMnistError(f"{where}: lacks {', '.join(sorted(missing))}")
        if not all(is_number(record[key]) for key in ("epoch", "test_loss", "test_accuracy")):
            raise TinyMnistError(f"{where}: epoch, test_loss or test_accuracy is not a number")
        # seed and lr group a sweep's lines: a list or an object there cannot be a key
        if not all(is_number(record.get(key)) or record.get(key) is None for key in ("seed", "initial_lr", "lr")):
            raise TinyMnistError(f"{where}: seed, initial_lr or lr is not a number")
        epoch, accuracy = record["epoch"], record["test_accuracy"]
        if not 0 <= epoch < EXACT_FLOAT_INTEGERS or not 0 <= accuracy <= 1:
            ranges = "epochs count from 0, accuracy is 0 to 1"
            raise TinyMnistError(f"{where}: epoch {epoch} or test_accuracy {accuracy} is out of range ({ranges})")
        records.append(record)
    if not records and cut_off:
        raise TinyMnistError(f"metrics file {path}: its only line is cut off; a run has not written a whole record yet")
    if not records:
        raise TinyMnistError(f"metrics file {path}: holds no evaluations; train with --metrics {path} first")
    if cut_off:
        print(f"tinymnist: note: {cut_off} is cut off; plotting the lines before it", file=sys.stderr)
    return records


def runs_of_file(path: Path, records: list[dict]) -> list[Run]:
    """Group one file's records into runs (see the module docstring)."""
    name = Path(path).name
    total = next((r["total"] for r in records if isinstance(r.get("total"), int)), None)
    swept = [r for r in records if "seed" in r and not r.get("ensemble")]
    ensemble = [r for r in records if r.get("ensemble")]
    single = [r for r in records if "seed" not in r and not r.get("ensemble")]
    if not swept and not ensemble:
        return [Run(name, summarize([single]), total=total)]
    by_lr: dict = defaultdict(lambda: defaultdict(list))  # the model's --lr -> seed -> records
    for r in swept:  # "lr" is the epoch's scheduled rate; "initial_lr" names the model
        by_lr[r.get("initial_lr", r.get("lr"))][r["seed"]].append(r)
    runs = []
    for lr, by_seed in by_lr.items():
        lr_label = f" lr={lr:g}" if len(by_lr) > 1 and isinstance(lr, (int, float)) else ""
        label = f"{name}{lr_label} ({len(by_seed)} seed{'s' if len(by_seed) > 1 else ''})"
        runs.append(Run(label, summarize(list(by_seed.values())), len(by_seed), total))
    if ensemble:
        runs.append(Run(f"{name} ensemble", summarize([ensemble]), total=total, ensemble=True))
    if single:  # a plain run's records appended to a sweep's file: a line of its own, never one more seed
        runs.append(Run(f"{name} single run (no seed)", summarize([single]), total=total))
    return runs


def summarize(models: list[list[dict]]) -> dict[str, Series]:
    """The per-epoch mean of each quantity over the models, with min and max when there are several."""
    per_model = [{r["epoch"]: r for r in records} for records in models]  # a resumed run repeats epochs: the last wins
    out = {}
    for quantity in QUANTITIES:
        rows = []  # (epoch, mean, min, max); epochs are fractional with --eval-every
        for epoch in sorted(set().union(*per_model)):
            found = [m[epoch].get(quantity) for m in per_model if epoch in m]  # ensembles have no train loss
            if found := [v for v in found if isinstance(v, (int, float)) and math.isfinite(v)]:
                rows.append((epoch, sum(found) / len(found), min(found), max(found)))
        if rows:
            epochs, values, low, high = zip(*rows, strict=True)
            out[quantity] = Series(epochs, values, *((low, high) if len(models) > 1 else ()))
    return out


def is_number(value) -> bool:
    """A JSON number: int or float, not true/false (which Python counts as ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
