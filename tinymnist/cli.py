"""The `tinymnist` command: train, eval, shapes, info, download, bench.

Flags map 1:1 onto `TrainConfig` fields and keep pytorch/examples' names. A flag
left out takes the model's seed recipe (config.RECIPES). Every mistake a user can
fix ends in one line on stderr and exit status 2; Ctrl-C ends a run with 130.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from tinymnist import checkpoint, data, models
from tinymnist.config import RECIPES, TrainConfig, recipe_config, validate
from tinymnist.devices import accelerator_report, check_compilable, cpu_compiler, resolve_device, use_tf32_matmuls
from tinymnist.errors import TinyMnistError
from tinymnist.report import LineReporter, ProgressReporter, RunObserver, test_line
from tinymnist.train import TrainState, evaluate, fit, initial_state, make_optimizer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__.split("\n")[0]
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def user_errors(command):
    """Turn a TinyMnistError into one stderr line and exit status 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TinyMnistError as e:
            print(f"tinymnist: error: {e}", file=sys.stderr)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper


DataDir = typer.Option(None, "--data-dir", help="Folder of the MNIST files [default: $TINYMNIST_DATA or ./data].")


@app.command()
@user_errors
def train(
    model: str | None = typer.Option(
        None, help="mlp, mlp3, cnn or lenet [default: cnn, or the --resume checkpoint's]."
    ),
    optimizer: str | None = typer.Option(
        None, help="sgd, adam, adamw, adadelta or rmsprop [default: the model's recipe]."
    ),
    batch_size: int | None = typer.Option(None, help="Training images per step [default: the recipe's]."),
    test_batch_size: int | None = typer.Option(None, help="Images per evaluation chunk [default: the recipe's]."),
    epochs: int | None = typer.Option(
        None, help="Total epochs; with --resume, continue up to this one [default: the recipe's]."
    ),
    lr: float | None = typer.Option(
        None, help="Learning rate of epoch 1 [default: the recipe's, or torch.optim's for another --optimizer]."
    ),
    gamma: float | None = typer.Option(
        None, help="Multiply the learning rate by this after every epoch (StepLR) [default: the recipe's]."
    ),
    seed: int | None = typer.Option(None, help="Seeds init, shuffling and dropout [default: 1]."),
    log_interval: int | None = typer.Option(None, help="Steps between log lines [default: 10]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="One step and one evaluation, to check the setup."),
    save_model: Path | None = typer.Option(None, help="Write a checkpoint here after every epoch (atomically)."),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps [default: auto]."),
    no_accel: bool = typer.Option(False, "--no-accel", help="Same as --device cpu."),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the step [default: on for CUDA and for a CPU with a C++ compiler; off on MPS].",
    ),
    micro_batch: int | None = typer.Option(
        None, help="Compute each step's gradient in chunks of this many images; 0: whole batch [default: 256 on CPU]."
    ),
    cuda_graphs: bool | None = typer.Option(
        None, "--cuda-graphs/--no-cuda-graphs", help="On CUDA, replay each step as one CUDA graph [default: on]."
    ),
    data_dir: Path | None = DataDir,
    no_download: bool = typer.Option(False, "--no-download", help="Fail instead of downloading missing MNIST files."),
    metrics: Path | None = typer.Option(None, help="Append one JSON object per evaluation to this JSON Lines file."),
    resume: Path | None = typer.Option(None, help="Continue from this checkpoint (--epochs is the total)."),
):
    """Train a seed network on MNIST, with the tutorial's recipe as defaults."""
    flags = dict(
        batch_size=batch_size, test_batch_size=test_batch_size, epochs=epochs, lr=lr, gamma=gamma, seed=seed,
        log_interval=log_interval, dry_run=dry_run or None, compile=compile, micro_batch=micro_batch,
        cuda_graphs=cuda_graphs,
        device="cpu" if no_accel else device, data_dir=str(data.resolve_data_dir(data_dir)),
        download=not no_download, save_model=save_model and str(save_model),
        metrics=metrics and str(metrics), resume=resume and str(resume),
    )  # fmt: skip
    saved = None
    if resume:
        saved_config, saved = checkpoint.load(resume, torch.device("cpu"))
        for flag, name in (("--model", model), ("--optimizer", optimizer)):
            if name is not None and name != saved_config[flag[2:]]:
                raise TinyMnistError(
                    f"{flag} {name} does not match checkpoint {resume} ({saved_config[flag[2:]]}); leave it out"
                )
        config = TrainConfig(**{**saved_config, **{k: v for k, v in flags.items() if v is not None}})
    else:
        if model is not None and model not in RECIPES:
            raise TinyMnistError(f"--model {model!r} is unknown; choose one of {', '.join(RECIPES)}")
        config = recipe_config(model or "cnn", optimizer, **flags)
    config = validate(config)
    dev = resolve_device(config.device)
    use_tf32_matmuls(dev)
    if config.compile:
        check_compilable(dev)
    elif config.compile is None and dev.type == "cpu" and cpu_compiler() is None:
        print("tinymnist: no C++ compiler here, so the step runs eager; install one to compile it", file=sys.stderr)
    if config.save_model:
        checkpoint.check_writable(Path(config.save_model))
    mnist = load_data(Path(config.data_dir), dev, config.download)
    if saved is None:
        state = initial_state(config, make_optimizer(config), dev)
    else:
        state = checkpoint.to_device(saved, dev)
    run_training(config, mnist, dev, state)


def load_data(data_dir: Path, device: torch.device, download: bool) -> data.MNIST:
    if download and data.missing_files(data_dir):
        data.download(data_dir)
    return data.load_mnist(data_dir, device)


def run_training(config: TrainConfig, mnist: data.MNIST, device: torch.device, state: TrainState) -> None:
    console = Console()
    display = ProgressReporter(console) if console.is_terminal else LineReporter()
    observer = RunObserver(config, display, state)
    try:
        totals = fit(config, mnist, device, observer, state)
    except KeyboardInterrupt:
        observer.close()
        observer.save(observer.last_good)
        where = f", checkpoint of epoch {observer.last_good.epoch} in {config.save_model}" if config.save_model else ""
        print(f"tinymnist: interrupted{where}", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        observer.close()
    last = observer.records[-1]
    print(
        f"Final test accuracy: {100 * last['test_accuracy']:.2f}% ({last['correct']}/{last['total']}) "
        f"after {totals['state'].epoch} epochs on {device}; training {totals['train_seconds']:.1f} s "
        f"(+ {totals['compile_seconds']:.1f} s {'compiling' if totals['compiled'] else 'first step'}), "
        f"{totals['images_per_second']:,.0f} images/s"
    )


@app.command("eval")
@user_errors
def eval_command(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT", help="A file written by train --save-model."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object instead of the log line."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    data_dir: Path | None = DataDir,
    no_download: bool = typer.Option(False, "--no-download", help="Fail instead of downloading missing MNIST files."),
):
    """Evaluate a checkpoint on the MNIST test set."""
    dev = resolve_device(device)
    use_tf32_matmuls(dev)  # as train evaluated it
    saved_config, state = checkpoint.load(checkpoint_path, dev)
    config = TrainConfig(**saved_config)
    mnist = load_data(data.resolve_data_dir(data_dir), dev, not no_download)
    result = evaluate(config, state.params, mnist.test_images, mnist.test_labels)
    record = {"model": config.model, "epoch": state.epoch, "test_loss": result.loss, "test_accuracy": result.accuracy,
              "correct": result.correct, "total": result.total}  # fmt: skip
    print(json.dumps(record) if json_output else test_line(record))


@app.command("shapes")
@user_errors
def shapes_command(model: str = typer.Argument(..., help="mlp, mlp3, cnn or lenet.")):
    """Trace a network layer by layer: output shapes, the arithmetic, parameter counts."""
    if model not in RECIPES:
        raise TinyMnistError(f"MODEL {model!r} is unknown; choose one of {', '.join(RECIPES)}")
    table = Table(title=f"{model}: input (1, 28, 28)")
    for column in ("layer", "output shape", "arithmetic", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    rows = models.trace(model)
    for row in rows:
        table.add_row(row.layer, str(row.shape), row.arithmetic, f"{row.params:,}")
    table.add_row("total", "", "", f"{sum(r.params for r in rows):,}", style="bold")
    Console().print(table)


@app.command()
@user_errors
def info():
    """torch version and build, accelerators, and a matmul on each of them."""
    table = Table(show_header=False)
    for what, value in accelerator_report():
        table.add_row(what, value)
    Console().print(table)


@app.command()
@user_errors
def download(data_dir: Path | None = DataDir):
    """Fetch the four MNIST files (mirrors, md5-checked) into the data folder."""
    folder = data.resolve_data_dir(data_dir)
    data.download(folder)
    print(f"MNIST files are in {folder}")


@app.command()
@user_errors
def bench(
    model_list: str = typer.Option("mlp,mlp3,cnn,lenet", "--models", help="Comma-separated models to time."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps."),
    data_dir: Path | None = DataDir,
    window_images: int = typer.Option(4096, help="Images per timed window (rounded to whole batches)."),
    repeats: int = typer.Option(5, help="Timed windows per loop; the median counts."),
    warmup: int = typer.Option(3, help="Untimed steps after the first (compiling) one."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="Also time the compiled step."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the raw results to this JSON file."),
):
    """Images/s of the tutorials' DataLoader loop against tinymnist's step (BENCHMARKS.md)."""
    from tinymnist.bench import run_bench  # imports torch.utils.data and pillow only here

    names = [m.strip() for m in model_list.split(",") if m.strip()]
    for name in names:
        models.check_model(name)
    if window_images < 1 or repeats < 1 or warmup < 0:
        raise TinyMnistError("--window-images and --repeats must be positive, --warmup at least 0")
    dev = resolve_device(device)
    use_tf32_matmuls(dev)  # for all three loops alike
    if compile:
        check_compilable(dev)
    report = run_bench(names, dev, data.resolve_data_dir(data_dir), window_images, repeats, warmup, compile)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    table = Table(title=f"{report['machine']}, torch {report['torch']}; data: {report['data']}")
    for column in ("model", "batch", "ref img/s", "eager img/s", "compiled img/s",
                   "eager/ref", "compiled/ref", "compile s", "peak MB"):  # fmt: skip
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in report["results"]:
        compiled = r.get("compiled")
        table.add_row(
            r["model"], str(r["batch_size"]),
            f"{r['reference']['images_per_second']:,.0f}", f"{r['eager']['images_per_second']:,.0f}",
            f"{compiled['images_per_second']:,.0f}" if compiled else "-",
            f"{r['eager_vs_reference']:.2f}x", f"{r['compiled_vs_reference']:.2f}x" if compiled else "-",
            f"{compiled['first_step_seconds']:.1f}" if compiled else "-",
            f"{max(v['peak_memory_mb'] for v in r.values() if isinstance(v, dict)):,.0f}",
        )  # fmt: skip
    console = Console()
    (console if console.is_terminal else Console(width=120)).print(table)  # a log file gets every digit


def main() -> None:
    app()
