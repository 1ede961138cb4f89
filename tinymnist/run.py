"""`tinymnist train` around the loop: everything checked first, then fit, checkpoints, the last line.

The order matters, because a run must never fail after an hour for a reason it could
have found in a second, nor lose what it has done:

1. the config (flags, or a checkpoint's config plus flags) is validated;
2. the device, the compiler, and every output path are checked, and the output files
   are locked, so a second run on the same files refuses instead of interleaving;
3. the data is loaded and the batch size checked against it;
4. fit trains; each completed epoch is checkpointed (atomically, never a partial
   epoch) by `on_epoch_end`; Ctrl-C or SIGTERM ends the run keeping that checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch
from rich.console import Console

from tinymnist import checkpoint, data, distributed, interrupts, outputs, transforms
from tinymnist.config import TrainConfig, check_batch_fits, make_optimizer, model_grid, validate
from tinymnist.devices import check_compilable, cpu_compiler, resolve_device
from tinymnist.errors import TinyMnistError
from tinymnist.report import LineReporter, MetricsFile, ProgressReporter, Reporters
from tinymnist.train import FitResult, NonFiniteLoss, TrainState, fit, initial_state

# What a resumed run takes from its checkpoint: what was trained. Where and how to run
# it (device, data, compile, output files) comes from the command that resumes it, so a
# resumed run writes only where its own command says.
TRAINED_FIELDS = ("model", "optimizer", "lr", "gamma", "schedule", "label_smoothing", "batch_size",
                  "test_batch_size", "epochs", "seed", "log_interval", "seeds", "lrs")  # fmt: skip


class Finished(Exception):
    """A resumed checkpoint that already holds every epoch asked for: nothing to train."""


def resumed_config(path: Path, flags: dict) -> tuple[TrainConfig, TrainState]:
    """The checkpoint's trained fields, overridden by the flags given now; its state on the CPU."""
    saved_config, state = checkpoint.load(path, torch.device("cpu"))
    for flag in ("model", "optimizer"):
        if flags.get(flag) is not None and flags[flag] != saved_config[flag]:
            raise TinyMnistError(f"--{flag} {flags[flag]} does not match checkpoint {path} "
                                 f"({saved_config[flag]}); leave it out")  # fmt: skip
    trained = {k: saved_config[k] for k in TRAINED_FIELDS}
    config = TrainConfig(**{**trained, **{k: v for k, v in flags.items() if v is not None}})
    grid, saved_grid = model_grid(config), model_grid(TrainConfig(**trained))
    other_seeds = (config.seed, config.seeds) != (trained["seed"], trained["seeds"])  # its weights came from those
    one_rate_for_many = flags.get("lr") is not None and len(saved_grid) > 1  # each model keeps its own rate
    other_models = max(len(grid), len(saved_grid)) > 1 and grid != saved_grid  # N models: stacked in that order
    if other_seeds or one_rate_for_many or other_models:
        raise TinyMnistError(f"--seed/--seeds/--lr do not match the models of checkpoint {path}; leave them out")
    validate(config)  # a flag given now (--epochs -3) is checked before it is compared
    one_cycle = config.schedule == trained["schedule"] == "one-cycle"
    if one_cycle and config.epochs != trained["epochs"]:  # every step's rate depends on the run's total steps
        raise TinyMnistError(f"--epochs {config.epochs}: checkpoint {path} follows a one-cycle schedule over "
                             f"{trained['epochs']} epoch(s), which it cannot stretch; leave --epochs out")  # fmt: skip
    if state.epoch >= config.epochs:
        more = f"pass --epochs {state.epoch + 1} or more to continue" if not one_cycle else "its one-cycle has ended"
        raise Finished(f"checkpoint {path} has completed {state.epoch} of --epochs {config.epochs}; "
                       f"nothing to train ({more})")  # fmt: skip
    return config, state


def train(config: TrainConfig, resumed: TrainState | None = None,
          cluster: distributed.Cluster | None = None) -> FitResult:  # fmt: skip
    """Run `tinymnist train` for a config: check everything, lock the outputs, train, print the last line."""
    config = validate(config)
    device = resolve_device(config.device)
    transforms.use_tf32_matmuls(device)
    if config.compile:
        check_compilable(device)
    elif config.compile is None and device.type == "cpu" and cpu_compiler() is None:
        print("tinymnist: no C++ compiler here, so the step runs eager; install one to compile it", file=sys.stderr)
    paths = {"--save-model": config.save_model, "--metrics": config.metrics}
    paths = {flag: Path(p) for flag, p in paths.items() if p}
    for flag, path in paths.items():
        outputs.check_output_path(path, flag)
        if config.resume and flag != "--save-model" and path.resolve() == Path(config.resume).resolve():
            raise TinyMnistError(f"{flag} {path} is the checkpoint being resumed; name another file")
    if config.tensorboard:
        from tinymnist.viz.extras import require

        require("torch.utils.tensorboard", "--tensorboard")  # a missing extra is found now, not after loading
        outputs.check_output_folder(Path(config.tensorboard), "--tensorboard")
    with outputs.exclusive(paths):  # a second run on these files refuses; a dead run's temp files go
        mnist = data.load_mnist(Path(config.data_dir), device, download=config.download)  # downloads what is missing
        check_batch_fits(config, len(mnist.train_images))
        optimizer = make_optimizer(config)
        if len(model_grid(config)) > 1:  # N models in one vmapped step: --seeds, --lr a,b (ensemble_run.py)
            from tinymnist.ensemble_run import train_many

            return train_many(config, mnist, optimizer, device, resumed, paths.get("--metrics"), cluster)
        state = initial_state(config, optimizer, device) if resumed is None else checkpoint.to_device(resumed, device)
        data_parallel = None
        if cluster is not None:  # one of torchrun's processes (distributed.launch)
            state = distributed.own_dropout(state, config.seed, cluster, device)
            data_parallel = functools.partial(distributed.all_reduced, cluster=cluster)
        step = transforms.device_step(config, optimizer, device, data_parallel)
        result = train_and_save(config, mnist, state, step, paths.get("--metrics"), append=resumed is not None)
    compiled = transforms.use_compile(config, device)
    compile_note = f"(+ {result.first_step_seconds:.1f} s {'compiling' if compiled else 'first step'})"
    if config.target_accuracy is not None:
        print(target_line(config.target_accuracy, result, compile_note))
        saved = saved_at_target(config, result, resumed) if result.reached and config.save_model else None
        if saved:
            print(saved)
    last = result.records[-1]
    print(
        f"Final test accuracy: {100 * last['test_accuracy']:.2f}% ({last['correct']}/{last['total']}) "
        f"after {last['epoch']:g} epoch{'' if last['epoch'] == 1 else 's'} on {device}; "
        f"training {result.train_seconds:.1f} s "
        f"{compile_note}, {result.images_per_second:,.0f} images/s"
    )
    return result


def saved_at_target(config: TrainConfig, result: FitResult, resumed: TrainState | None) -> str | None:
    """Checkpoints hold whole epochs (a resumed run starts at an epoch's data order), so a
    target reached inside an epoch is not what --save-model holds: say what it does hold."""
    reached, completed = result.reached["epoch"], result.state.epoch
    trained_now = completed > (resumed.epoch if resumed else 0)
    if reached == completed and trained_now:
        return None  # the checkpoint is the network that reached the target
    where = f"the target was reached at epoch {reached:g}"
    if trained_now:
        return f"{where}; {config.save_model} holds epoch {completed}, the last completed one"
    return f"{where}; no epoch completed, so nothing was saved to {config.save_model}"


def target_line(target: float, result: FitResult, compile_note: str) -> str:
    """--target-accuracy: when it was reached (training time, images), or that it was not."""
    hit = result.reached
    if hit is None:
        best = max(r["test_accuracy"] for r in result.records)
        return f"Target {100 * target:.2f}% not reached: best {100 * best:.2f}% in {result.state.epoch} epochs"
    return (f"Reached {100 * hit['test_accuracy']:.2f}% (target {100 * target:.2f}%) at epoch {hit['epoch']:g}: "
            f"{hit['train_seconds_total']:.2f} s of training {compile_note}, "
            f"{hit['images_total']:,} images")  # fmt: skip


def train_and_save(config: TrainConfig, mnist: data.MNIST, state: TrainState, step, metrics_path: Path | None,
                   append: bool, fit_function=fit, display=None, gathered=None) -> FitResult:  # fmt: skip
    """fit, with each completed epoch checkpointed and a stop (NaN, Ctrl-C, SIGTERM) said truthfully.

    An N-model run (ensemble_run.py) passes its own `fit_function`, a `display` around the log
    lines, and under torchrun `gathered`, which brings every process's models to rank 0."""
    saved: list[int] = []  # epochs this run has checkpointed

    def save(state: TrainState) -> None:
        if gathered:  # every rank sends its share; rank 0 saves all N
            state = gathered(state)
        if config.save_model:
            with interrupts.shielded():  # a signal now waits until the file and `saved` agree
                checkpoint.save(Path(config.save_model), config.to_dict(), state)
                saved.append(state.epoch)

    console = Console()
    lines = ProgressReporter(console) if console.is_terminal else LineReporter()
    reporters = [display(lines) if display else lines]
    if config.tensorboard:  # before --metrics, whose file a new run starts afresh: a folder that fails loses nothing
        from tinymnist.viz.tensorboard_log import tensorboard_reporter

        reporters.append(tensorboard_reporter(config, len(mnist.train_images)))
    if metrics_path:
        reporters.append(MetricsFile(metrics_path, append))
    reporter = Reporters(*reporters)
    with contextlib.closing(reporter):
        try:
            return fit_function(config, mnist, state, step, reporter, on_epoch_end=save)
        except NonFiniteLoss as e:
            raise TinyMnistError(f"{e}{kept(config, saved)}") from None
        except KeyboardInterrupt as stop:
            reporter.close()
            by = " by SIGTERM" if isinstance(stop, interrupts.Terminated) else ""
            nothing = "; no epoch completed, nothing saved" if config.save_model else "; no --save-model, nothing saved"
            print(f"tinymnist: interrupted{by}{kept(config, saved) or nothing}", file=sys.stderr)
            raise


def kept(config: TrainConfig, saved: list[int]) -> str:
    """What survives a stopped run, said truthfully."""
    if saved:
        return f"; the checkpoint of epoch {saved[-1]} is kept in {config.save_model}"
    return ""
