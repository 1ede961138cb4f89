"""The picture commands `tinymnist plot`, `predict` and `export`, added to the app by `register`.

Like every tinymnist command, a mistake the user can fix ends in one stderr line and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer
from rich.console import Console

from tinymnist import data
from tinymnist.algorithm.config import TrainConfig, model_grid
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint, outputs
from tinymnist.tool.devices import resolve_device
from tinymnist.tool.exits import user_errors
from tinymnist.tool.extras import require
from tinymnist.tool.report import counted
from tinymnist.transforms.speed import use_tf32_matmuls
from tinymnist.transforms.vmap import one_model
from tinymnist.viz.curves import write_curves_png
from tinymnist.viz.digits import plain_digits, terminal_digits, write_digits_png
from tinymnist.viz.export import check_export_name, export_state_dict
from tinymnist.viz.predict import labelled_digits, pick, predict_images, probabilities
from tinymnist.viz.runs import read_runs
from tinymnist.viz.textplot import numbers_table, text_plot

DEFAULT_COUNT = 16  # test digits shown: two rows of a PNG grid


def register(app: typer.Typer) -> None:
    app.command("plot")(user_errors(plot))
    app.command("predict")(user_errors(predict))
    app.command("export")(user_errors(export))


def plot(
    metrics: list[Path] = typer.Argument(..., metavar="METRICS.jsonl...", help="Files written by train --metrics."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Write a PNG here; without it, draw in the terminal.", show_default=True
    ),
):
    """Loss and accuracy per epoch, one line per run: in the terminal, or as a PNG with -o."""
    if output is not None:
        require("matplotlib.figure", "plot -o")  # before any work, as every extra is checked
        outputs.check_png_output(output, inputs=dict.fromkeys(metrics, "a metrics file plot reads"))
    runs = read_runs(metrics)
    if output is not None:
        write_curves_png(runs, output)
        print(f"wrote {output}")
        return
    console = Console()
    if console.is_terminal:
        console.print(text_plot(runs, console.width))
    else:  # a pipe or a log: the numbers, which grep and diff can use
        print(numbers_table(runs))


def predict(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT", help="A file written by train --save-model."),
    count: int | None = typer.Option(
        None, "--count", help="How many test digits to show (not with --image).", show_default=str(DEFAULT_COUNT)
    ),
    wrong: bool = typer.Option(
        False, "--wrong", help="Only misclassified test digits, the most confident first.", show_default=True
    ),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Write the digits as a PNG grid instead of drawing them.", show_default=True
    ),
    image: list[Path] | None = typer.Option(
        None, "--image", metavar="FILE", help="Your own PNG/JPEG of a digit, instead of test digits; repeat for more."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Folder of the MNIST test files.", show_default="$TINYMNIST_DATA or ./data"
    ),
    no_download: bool = typer.Option(False, "--no-download", help="Fail instead of downloading missing test files."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps.", show_default=True),
    seed: int | None = typer.Option(
        None, "--seed", help="Of a checkpoint of several models (--seeds, an --lr list): the seed of the one to take."
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Of a checkpoint of several models: the rate of the one to take."
    ),
):
    """Digits with the checkpoint's prediction and probability: test digits, or --image files."""
    if image:  # pillow reads them
        require("PIL.Image", "predict --image")
    if output is not None:  # pillow draws the grid
        require("PIL.Image", "predict -o")
    if image and wrong:
        raise TinyMnistError("--wrong picks misclassified test digits; your --image files have no true label")
    if image and count is not None:  # an error, not a note, as for --wrong: the flag could only be ignored
        raise TinyMnistError(
            f"--count {count} picks how many test digits to show; --image shows every file given: drop --count"
        )
    count = DEFAULT_COUNT if count is None else count
    if count < 1:
        raise TinyMnistError(f"--count {count}: must be at least 1")
    if output is not None:  # a picture may replace any PNG, except one this command reads
        inputs = dict.fromkeys(image or [], "an --image file predict reads")
        inputs[checkpoint_path] = "the checkpoint predict reads"
        outputs.check_png_output(output, inputs=inputs)
    dev = resolve_device(device)
    use_tf32_matmuls(dev)  # as train and eval compute, so the mistakes are the ones eval counts
    config, state = checkpoint.load(checkpoint_path, dev)
    params, which = picked_model(config, state.params, checkpoint_path, seed, lr)
    model = config["model"]
    if image:
        results = predict_images(model, params, image, dev)
        for digit, top in results:
            alternatives = ", ".join(f"{d} {100 * p:.1f}%" for d, p in top)
            print(f"{digit.name}: {digit.predicted} ({100 * digit.probability:.1f}%); top {len(top)}: {alternatives}")
        digits = [digit for digit, _ in results]  # as the network saw them: 28x28, centred
    else:
        images, labels = data.load_test_split(data.resolve_data_dir(data_dir), dev, download=not no_download)
        probs = probabilities(model, params, images)  # (T, 10)
        wrong_count = int((probs.argmax(dim=1) != labels).sum())
        digits = labelled_digits(probs, images, labels, pick(probs, labels, count, wrong))
        if 0 < len(digits) < count:  # a note, not an error: what there is, is what --count asked for
            there = (
                counted(wrong_count, "mistake") + " in the test set" if wrong else counted(len(labels), "test digit")
            )
            print(f"tinymnist: note: --count {count} is more than the {there}; showing every one", file=sys.stderr)
        trained = f"{model}{which} after {counted(state.epoch, 'epoch')}"
        print(f"{trained}: {wrong_count} of {len(labels)} test digits wrong; {shown(len(digits), wrong)}:")
        if not digits:
            return
    if output is not None:
        write_digits_png(digits, output)
        print(f"wrote {output}")
        return
    console = Console()
    draw = terminal_digits if console.is_terminal else plain_digits
    console.print(draw(digits, console.width))


def export(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT", help="A file written by train --save-model."),
    output: Path = typer.Option(
        ..., "-o", "--output", help="model.pt, model.pth or model.safetensors; the suffix picks the format."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Of a checkpoint of several models (--seeds, an --lr list): the seed of the one to take."
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Of a checkpoint of several models: the rate of the one to take."
    ),
):
    """A plain state_dict that the tutorial's own nn.Module loads with strict=True."""
    check_export_name(output)  # the suffix, and safetensors if it names that format: before any work
    config, state = checkpoint.load(checkpoint_path, torch.device("cpu"))
    params, which = picked_model(config, state.params, checkpoint_path, seed, lr)
    outputs.check_output_path(output, "-o")  # a symlink, a folder, a device: refused as for every output
    if checkpoint.peek(output) is not None:  # the checkpoint itself, or another run's
        raise TinyMnistError(f"-o {output} is a tinymnist checkpoint, which export would replace; name another file")
    with outputs.exclusive({"-o": output}):  # a run saving to that file refuses it, and vice versa
        export_state_dict(config["model"], params, output)
    after = counted(state.epoch, "epoch")
    print(f"wrote {output}: the {config['model']}{which} state_dict after {after}, for the tutorial's nn.Module")


def picked_model(config: dict, params: dict, path: Path, seed: int | None, lr: float | None) -> tuple[dict, str]:
    """The one network predict and export take: the checkpoint's own, or of a checkpoint of N (--seeds, an --lr
    list: every tensor with a leading dim N) the one --seed and --lr pick; and its name for the output."""
    grid = model_grid(TrainConfig(**config))  # (lr, seed) of each model, in the order they are stacked
    picked = [i for i, (rate, s) in enumerate(grid) if seed in (None, s) and lr in (None, rate)]
    held = ", ".join(f"--seed {s} --lr {rate!r}" for rate, s in grid)  # repr: what --lr gives back exactly
    if len(picked) != 1:
        flags = (f"--seed {seed}" if seed is not None else "", f"--lr {lr!r}" if lr is not None else "")
        asked = " ".join(flag for flag in flags if flag)
        if not asked:
            which = "pick one with --seed and --lr"
        elif not picked:
            which = f"{asked} is none of them"
        else:
            which = f"{asked} names {len(picked)} of them: pick one with --seed and --lr"
        raise TinyMnistError(f"{path} holds {counted(len(grid), 'model')} ({held}): {which}")
    if len(grid) == 1:
        return params, ""
    (i,) = picked
    rate, s = grid[i]
    # copies: torch.save writes a view's whole storage, all N models
    return {name: tensor.clone() for name, tensor in one_model(params, i).items()}, f" (seed {s}, lr {rate!r})"


def shown(count: int, wrong: bool) -> str:
    """Which test digits follow: "the first 16 test digits", "the most confident mistake", ..."""
    if wrong:
        return "the most confident mistake" if count == 1 else f"the {count} most confident mistakes"
    return "the first test digit" if count == 1 else f"the first {count} test digits"
