"""The `tinymnist` command: train, eval, plot, predict, export, shapes, info, download, bench.

Flags map 1:1 onto `TrainConfig` fields and keep pytorch/examples' names; a flag left out
takes the model's recipe (config.RECIPES). A mistake the user can fix is one stderr line, exit 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from tinymnist import __version__, data
from tinymnist.algorithm import networks
from tinymnist.algorithm.config import RECIPES, TrainConfig, model_configs, parse_lrs, recipe_config
from tinymnist.algorithm.train import Progress, evaluate_one, evaluation_records
from tinymnist.data import sources
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint, extras, outputs, run
from tinymnist.tool.bench import (
    Timing,
    bench_data,
    check_counts_fit,
    print_report,
    print_seeds_report,
    run_bench,
    run_seeds_bench,
    write_json,
)
from tinymnist.tool.busy_core import print_busy_core_report, run_busy_core_bench
from tinymnist.tool.devices import accelerator_report, resolve_device
from tinymnist.tool.exits import OneLineUsageErrors, user_errors
from tinymnist.tool.floor import print_floor_report, run_floor_bench
from tinymnist.tool.reference import require_pillow
from tinymnist.tool.report import json_line, model_test_line
from tinymnist.tool.time_to_accuracy import MODELS as TIME_TO_ACCURACY_MODELS
from tinymnist.tool.time_to_accuracy import print_time_to_accuracy, run_time_to_accuracy
from tinymnist.transforms import first_conv
from tinymnist.transforms.denormals import flush_denormals
from tinymnist.transforms.freed_memory import reuse_freed_memory
from tinymnist.transforms.speed import check_compilable, use_tf32_matmuls
from tinymnist.transforms.vmap import evaluate_many
from tinymnist.viz import confusion as viz_confusion
from tinymnist.viz.predict import probabilities

app = typer.Typer(
    cls=OneLineUsageErrors,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=__doc__.split("\n")[0],
    context_settings={"help_option_names": ["-h", "--help"]},
)

MODELS = ", ".join(RECIPES)


def show_version(value: bool) -> None:
    if value:
        print(f"tinymnist {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=show_version, is_eager=True, help="Print the version."),
):
    """MNIST trained with raw tensors, torch.func and torch.compile: no torchvision, no DataLoader."""


def unset(help: str, shown: str):
    """An option that defaults to None; --help shows `shown`, what None means."""
    return typer.Option(None, help=help, show_default=shown)


RECIPE = "the recipe's"
DataDir = typer.Option(None, "--data-dir", help="Folder of the MNIST files.", show_default="$TINYMNIST_DATA or ./data")
Device = typer.Option("auto", help="auto, cpu, cuda, cuda:N or mps.")
NoDownload = typer.Option(
    False,
    "--no-download",
    help="Fail instead of downloading missing MNIST files.",
    show_default="off: download what is missing",
)


@app.command()
@user_errors
def train(
    model: str | None = unset(f"One of {MODELS}.", "cnn, or the checkpoint's"),
    optimizer: str | None = unset("sgd, adam, adamw, adadelta or rmsprop.", RECIPE),
    batch_size: int | None = unset("Training images per step.", RECIPE),
    test_batch_size: int | None = unset("Images per evaluation chunk.", RECIPE),
    epochs: int | None = unset(
        "Total epochs; with --resume, continue up to this one.", "the recipe's, or the checkpoint's"
    ),
    lr: str | None = unset(
        "Learning rate of epoch 1 (one-cycle: the peak); a comma-separated "
        "list (0.5,1,2) trains one model per rate, all at once.",
        "the recipe's; torch.optim's for another --optimizer",
    ),
    seeds: str | None = unset(
        "Train this many models at once, seeded --seed, --seed+1, ... (with an --lr list: per rate).", "1"
    ),
    gamma: float | None = unset("Multiply the learning rate by this after every epoch (StepLR).", RECIPE),
    schedule: str | None = unset(
        "step: StepLR by --gamma each epoch; one-cycle: OneCycleLR rising to --lr and falling over the whole run.",
        RECIPE,
    ),
    label_smoothing: float | None = unset("Label smoothing of the training loss (0 to <1).", RECIPE),
    target_accuracy: float | None = unset(
        "Stop at the first evaluation at or above this test accuracy (0.99 = 99%) and report the time to reach it.",
        "none: train every epoch",
    ),
    eval_every: int | None = unset(
        "Also evaluate every this many steps (cheap: the test set is on the device).", "once per epoch"
    ),
    seed: int | None = unset("Seeds init, shuffling and dropout.", "1"),
    log_interval: int | None = unset("Steps between log lines.", "10"),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="One step and one evaluation, to check the setup; "
        "writes no output (the paths are checked, no checkpoint, metrics or TensorBoard is written).",
        show_default="off",
    ),
    save_model: Path | None = unset(
        "Write a checkpoint here after every epoch (atomically); never over an earlier run's (resume it).",
        "none: nothing is saved",
    ),
    device: str | None = unset("auto, cpu, cuda, cuda:N or mps.", "auto"),
    no_accel: bool = typer.Option(
        False, "--no-accel", help="Train on the CPU (pytorch/examples' flag).", show_default="off"
    ),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the step.",
        show_default="on for CUDA and for a CPU with a C++ compiler, off on MPS",
    ),
    micro_batch: int | None = unset(
        "Compute each step's gradient in chunks of this many images; 0: the whole batch at once.",
        "0; on the CPU with --seeds or an --lr list: 256 a model",
    ),
    cuda_graphs: bool = typer.Option(
        True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA, replay each step as one CUDA graph."
    ),
    steps_per_call: int = typer.Option(
        1,
        help="CPU: steps per compiled call (one model, fixed threads), at most --log-interval, --eval-every "
        "and an epoch's batches. For long or repeated mlp, mlp3 runs: 1.3-2x faster after a 30-50 s compile.",
    ),
    threads: int | None = unset(
        "CPU threads, fixed: the same numbers to the last bit whatever else the machine runs "
        "(compiled cnn, lenet: pin TINYMNIST_FIRST_CONV too, docs/usage.md).",
        "all cores, fewer while another program takes one",
    ),
    data_dir: Path | None = DataDir,
    no_download: bool = NoDownload,
    metrics: Path | None = unset(
        "Write one JSON object per evaluation to this JSON Lines file: "
        "a new run refuses an earlier run's, a resumed run appends to one that ends at its checkpoint.",
        "none",
    ),
    tensorboard: Path | None = unset("Also write TensorBoard scalars into this folder (needs the viz extra).", "none"),
    resume: Path | None = unset(
        "Continue from this checkpoint (--epochs is the total); it is only read: save with --save-model. "
        "What was trained comes from it; a flag given now (--lr, --batch-size) replaces it, with a note.",
        "a new run",
    ),
):
    """Train a network on MNIST, with its tutorial's recipe as defaults."""
    if no_accel and device not in (None, "cpu"):
        raise TinyMnistError(f"--no-accel means --device cpu, but --device {device} was given; pass only one")
    rates = None if lr is None else parse_lrs(lr)  # a list trains one model per rate
    if threads is not None and threads > (cores := usable_cores()):
        log(f"tinymnist: --threads {threads} is more than this machine's {cores} cores; the extra ones wait their turn")
    flags = dict(
        model=model,
        optimizer=optimizer,
        batch_size=batch_size,
        test_batch_size=test_batch_size,
        epochs=epochs,
        lr=rates[0] if rates else None,
        lrs=rates if rates and len(rates) > 1 else None,
        seeds=None if seeds is None else parse_seeds(seeds),
        gamma=gamma,
        schedule=schedule,
        label_smoothing=label_smoothing,
        target_accuracy=target_accuracy,
        eval_every=eval_every,
        seed=seed,
        log_interval=log_interval,
        dry_run=dry_run or None,
        compile=compile,
        micro_batch=micro_batch,
        cuda_graphs=cuda_graphs,
        threads=threads,
        steps_per_call=steps_per_call,
        device="cpu" if no_accel else device or "auto",
        data_dir=str(data.resolve_data_dir(data_dir)),
        download=not no_download,
        save_model=save_model and str(save_model),
        metrics=metrics and str(metrics),
        resume=resume and str(resume),
        tensorboard=tensorboard and str(tensorboard),
    )
    if resume:
        try:
            config, state = run.resumed_config(resume, flags)
        except run.Finished as done:
            print(f"tinymnist: {done}", file=sys.stderr)
            return
    else:
        config, state = recipe_config(model or "cnn", **{k: v for k, v in flags.items() if k != "model"}), None
    if gamma is not None and config.schedule == "one-cycle":
        raise TinyMnistError(
            f"--gamma {gamma} scales the step schedule; this run's is one-cycle (--schedule), "
            f"which has no gamma: leave --gamma out or pass --schedule step"
        )
    run.train(config, state)


@app.command("eval")
@user_errors
def eval_command(
    checkpoint_path: Path = typer.Argument(..., metavar="CHECKPOINT", help="A file written by train --save-model."),
    json_output: bool = typer.Option(
        False,
        "--json",
        help="Print JSON instead of the log line: one object; for N models one line per model, then the ensemble's.",
    ),
    confusion: bool = typer.Option(
        False,
        "--confusion",
        help="Also the 10x10 confusion matrix and each digit's accuracy (a table; with --json, two more keys).",
        show_default="off",
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="With --confusion: also draw it into this PNG (needs the viz extra).",
        show_default="none",
    ),
    device: str = Device,
    data_dir: Path | None = DataDir,
    no_download: bool = NoDownload,
):
    """Evaluate a checkpoint on the MNIST test set."""
    if output is not None:
        if not confusion:
            raise TinyMnistError("-o draws the confusion matrix: pass --confusion too")
        outputs.check_png_output(output, inputs={checkpoint_path: "the checkpoint eval reads"})
        extras.require("matplotlib.figure", "eval --confusion -o")  # before any work, as every extra is checked
    dev = resolve_device(device)
    use_tf32_matmuls(dev)  # as train evaluated it
    saved_config, state = checkpoint.load(checkpoint_path, dev)
    config = TrainConfig(**saved_config)
    images, labels = data.load_test_split(data.resolve_data_dir(data_dir), dev, download=not no_download)
    if confusion and config.n_models > 1:
        raise TinyMnistError(f"--confusion is for one model; {checkpoint_path} holds {config.n_models}")
    # The records the run's last evaluation made: one model's, or N models' each and the ensemble's.
    evaluate = evaluate_many if config.n_models > 1 else evaluate_one
    models = model_configs(config)
    progress = Progress(state.epoch, [None] * len(models), [m.lr for m in models], 0.0, 0)
    records = evaluation_records(models, progress, evaluate(config, state.params, images, labels))
    kept = ("test_loss", "test_accuracy", "correct", "total", "seed", "initial_lr", "ensemble", "models")
    lines = [{"model": config.model, "epoch": state.epoch, **{k: r[k] for k in kept if k in r}} for r in records]
    matrix = None
    if confusion:
        matrix = viz_confusion.confusion_matrix(probabilities(config.model, state.params, images).argmax(1), labels)
        lines[0] |= viz_confusion.confusion_dict(matrix) if json_output else {}
    print("\n".join(json_line(record) if json_output else model_test_line(record) for record in lines))
    if matrix is not None and not json_output:
        Console().print(viz_confusion.confusion_table(matrix))
    if matrix is not None and output is not None:
        viz_confusion.write_confusion_png(matrix, output)
        print(f"wrote {output}", file=sys.stderr if json_output else sys.stdout)  # --json: stdout is JSON lines


@app.command("shapes")
@user_errors
def shapes_command(model: str = typer.Argument(..., help=f"One of {MODELS}.")):
    """Trace a network layer by layer: output shapes, the arithmetic, parameter counts."""
    networks.check_model(model, "MODEL")  # the argument, not a --model flag
    table = Table(title=f"{model}: input (1, 28, 28)")
    rows = networks.trace(model)
    for column in ("layer", "output shape", "arithmetic", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for row in rows:
        table.add_row(row.layer, str(row.shape), row.arithmetic, f"{row.params:,}")
    table.add_row("total", "", "", f"{sum(r.params for r in rows):,}", style="bold")
    Console().print(table)


@app.command()
@user_errors
def info():
    """torch version and build, accelerators, and a matmul on each of them."""
    table = Table(show_header=False)
    for row in accelerator_report():
        table.add_row(*row)
    Console().print(table)


@app.command()
@user_errors
def download(
    data_dir: Path | None = DataDir,
    source: Path | None = typer.Option(
        None,
        "--from",
        show_default="download from the mirrors",
        help="Build the files from a copy you have instead: mnist.pkl.gz, Keras's mnist.npz, "
        "or a folder of IDX files (torchvision's MNIST/raw); each must have MNIST's md5.",
    ),
):
    """Fetch the four MNIST files (mirrors, md5-checked) into the data folder, or build them --from a copy."""
    folder = data.resolve_data_dir(data_dir)
    if source is None:
        data.download(folder)
    else:
        for name, written in sources.build_from(source, folder).items():
            done = f"rebuilt from {source}" if written else "already there, left as it is"
            print(f"{folder / name}: {done}; the md5 of its contents is MNIST's")
        if missing := data.missing_files(folder):
            raise data.MissingDataError(data.missing_data_message(folder, missing))
    print(f"MNIST files are in {folder}")


@app.command()
@user_errors
def bench(
    model_list: str | None = typer.Option(
        None, "--models", help="Comma-separated models to time.", show_default="mlp,mlp3,cnn,lenet"
    ),
    device: str = Device,
    data_dir: Path | None = DataDir,
    window_images: int | None = unset(
        "Images per timed window; with --seeds, each of the N models' share of a window (rounded down to "
        "whole batches, at least one).",
        "4096",
    ),
    repeats: int | None = unset(
        "Rounds of one timed window of every loop in turn (after an untimed one), each round starting one "
        "loop later; images/s is each loop's median window, a ratio the median of the rounds' own ratios "
        "(--busy-core: quiet and busy windows per round; --floor: rounds of every step in turn; "
        "--time-to-accuracy: whole runs of the three loops, in the same order each round, the median of "
        "their seconds).",
        "5; with --time-to-accuracy 1",
    ),
    warmup: int | None = unset("Steps after the first (compiling) one, timed apart from the windows.", "3"),
    compile: bool = typer.Option(
        True,
        "--compile/--no-compile",
        help="Also time the compiled step; --no-compile: only eager (with --seeds, --busy-core or "
        "--time-to-accuracy, the eager step instead of the compiled one).",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the raw results to this JSON file."),
    time_to_accuracy: float | None = typer.Option(
        None,
        "--time-to-accuracy",
        show_default="off",
        help="Instead: seconds of training until this test accuracy "
        "(0.99) for fast, cnn and the tutorials' cnn loop, on the real MNIST files (--repeats runs them that "
        "many times; the other timing options do not apply; --seeds gives one number of models trained at once).",
    ),
    seeds: str | None = typer.Option(
        None,
        "--seeds",
        show_default="off",
        help="Model counts, comma-separated (1,4,16): time N models in one step against N single runs instead.",
    ),
    busy_core: bool = typer.Option(
        False,
        "--busy-core",
        help="Instead: the CPU step on fixed threads and the adaptive one train runs, quiet and with one core "
        "kept busy by a process bench starts, in turn, in windows of seconds (--window-images does not apply).",
    ),
    floor: bool = typer.Option(
        False,
        "--floor",
        help="Instead: the compiled CPU step (and 10 steps per call, where they run) against its floor, the "
        "products and optimizer traffic it cannot skip, timed in turn for --repeats rounds "
        "(--window-images and --warmup do not apply).",
    ),
):
    """Images/s of the tutorials' DataLoader loop against tinymnist's step (BENCHMARKS.md)."""
    timing = {"--models": model_list, "--window-images": window_images, "--warmup": warmup}
    if busy_core and floor:
        raise TinyMnistError("--busy-core and --floor are two benchmarks; give one of them")
    if busy_core or floor:
        check_cpu_mode("--busy-core" if busy_core else "--floor", device, window_images, time_to_accuracy, seeds)
    if floor and warmup is not None:
        raise TinyMnistError(
            "--warmup does not apply to --floor (it compiles each step and calls it 3 times before timing); "
            "leave it out"
        )
    if floor and not compile:
        raise TinyMnistError("--floor times the compiled step; leave out --no-compile")
    if time_to_accuracy is not None and (given := [flag for flag, value in timing.items() if value is not None]):
        raise TinyMnistError(
            f"{given[0]} does not apply to --time-to-accuracy (fast, cnn and the tutorials' cnn "
            f"loop, each run to the target); leave out {given[0]} or --time-to-accuracy"
        )
    model_list = "mlp,mlp3,cnn,lenet" if model_list is None else model_list
    window_images = 4096 if window_images is None else window_images
    repeats = (1 if time_to_accuracy is not None else 5) if repeats is None else repeats
    warmup = 3 if warmup is None else warmup
    names = [m.strip() for m in model_list.split(",") if m.strip()]
    if not names:
        raise TinyMnistError(f"--models names no model; give some of {MODELS}, comma-separated")
    for name in names:
        networks.check_model(name, "--models")
    for flag, value, least in (
        ("--window-images", window_images, 1),
        ("--repeats", repeats, 1),
        ("--warmup", warmup, 0),
    ):
        if value < least:
            raise TinyMnistError(f"{flag} must be at least {least}, got {value}")
    if json_path is not None:
        outputs.check_output(json_path, "--json")  # before minutes of timing, not after
    if time_to_accuracy is not None or (seeds is None and not busy_core and not floor):
        require_pillow()  # the tutorials' loop is timed last, after minutes of ours
    dev = torch.device("cpu") if busy_core or floor else resolve_device(device)
    use_tf32_matmuls(dev)  # for all three loops alike
    if compile:
        check_compilable(dev, eager_too=not floor)
    first_conv.environment_choice()  # a mistyped $TINYMNIST_FIRST_CONV: now, as train does, not after the eager loops
    folder = data.resolve_data_dir(data_dir)
    data.check_data_dir(folder)  # a file there would pass for "no MNIST files", and random images be timed
    timing = Timing(window_images, repeats, warmup, compile, log)
    if time_to_accuracy is not None:
        if not 0 < time_to_accuracy <= 1:
            raise TinyMnistError(f"--time-to-accuracy is a fraction (0.99 for 99%), got {time_to_accuracy}")
        n = parse_counts(seeds, "one number of models, like --seeds 10") if seeds is not None else [1]
        if len(n) != 1:
            raise TinyMnistError(f"--seeds {seeds}: with --time-to-accuracy give one number of models, like --seeds 10")
        check_counts_fit(TIME_TO_ACCURACY_MODELS, n[0], dev)
        mnist = data.load_mnist(folder, dev)  # real digits: random ones never reach it
        rows, every_round = run_time_to_accuracy(
            mnist, dev, time_to_accuracy, compile, log=log, seeds=n[0], rounds=repeats
        )
        return print_time_to_accuracy(rows, time_to_accuracy, dev, json_path, every_round)
    if seeds is not None:  # N models per step against N single runs
        counts = parse_counts(seeds)
        # timed in turns: the single model and every count's models are held at once
        check_counts_fit(names, 1 + sum(counts), dev, flag="--seeds (every count and the single model at once)")
        report = run_seeds_bench(names, counts, dev, folder, timing)
        return print_seeds_report(report, json_path)
    if busy_core or floor:
        digits = bench_data(folder, dev)
        if floor:
            report = run_floor_bench(names, digits, repeats, log)
        else:
            report = run_busy_core_bench(names, digits, timing)
        if json_path:
            write_json(json_path, report)
        return print_floor_report(report) if floor else print_busy_core_report(report)
    report = run_bench(names, dev, folder, timing)
    print_report(report, json_path)


def log(message: str) -> None:
    """Benchmarks' progress, on stderr: stdout is the report."""
    print(message, file=sys.stderr)


def check_cpu_mode(mode: str, device: str, window_images: int | None, time_to_accuracy: float | None, seeds):
    """--busy-core and --floor time one model's CPU step in windows of seconds: what does not combine with them."""
    for flag, value in (
        ("--time-to-accuracy", time_to_accuracy),
        ("--seeds", seeds),
        ("--window-images", window_images),
    ):
        if value is not None:
            raise TinyMnistError(
                f"{flag} does not apply to {mode} (one model's CPU step, timed for seconds); leave out {flag} or {mode}"
            )
    if device not in ("auto", "cpu"):
        raise TinyMnistError(f"{mode} times the CPU step; use --device cpu, not {device}")
    if mode == "--busy-core" and torch.get_num_threads() < 2:
        raise TinyMnistError(
            f"--busy-core compares a step on all threads with one that drops some, but torch has "
            f"{torch.get_num_threads()} thread here; unset OMP_NUM_THREADS or run on 2 or more cores"
        )


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_counts(text: str, example: str = "model counts comma-separated, like --seeds 1,4,16") -> list[int]:
    """bench --seeds 1,4,16 as [1, 4, 16], or a one-line error naming the bad item and saying what to give."""
    counts = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) < 1:
            what = "an empty item" if not item.strip() else f"{item.strip()!r} is not a count of 1 or more"
            raise TinyMnistError(f"--seeds {text}: {what}; give {example}")
        counts.append(int(item))
    return list(dict.fromkeys(counts))  # each count once, in order


def parse_seeds(text: str) -> int:
    """train --seeds 4 as 4; a list of counts is bench's, a non-number a one-line error."""
    if "," in text:
        raise TinyMnistError(
            f"--seeds {text}: train takes one number of models, like --seeds 4; "
            f"tinymnist bench --seeds takes a list, to time several counts"
        )
    try:
        return int(text)
    except ValueError:
        raise TinyMnistError(f"--seeds {text}: give a whole number of models, like --seeds 4") from None


from tinymnist.viz.commands import register  # noqa: E402  (plot, predict, export: after the commands above)

register(app)


def main() -> None:
    flush_denormals()  # before torch's first parallel op, so that its threads start with it
    reuse_freed_memory()  # a step's new tensors on the pages the last step's freed, not fresh ones
    app()
