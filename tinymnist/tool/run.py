"""`tinymnist train` around the loop: everything checked first, then fit, checkpoints, the last line.

A run must never fail after an hour for a reason it could have found in a second, nor lose what it
has done. So the config, device, compiler, output paths (then locked), data, batch size and N models'
memory are all checked before training; each completed epoch is checkpointed atomically, and Ctrl-C
or SIGTERM ends the run keeping that checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
from pathlib import Path

import torch
from rich.console import Console

from tinymnist import data
from tinymnist.algorithm.config import (
    TrainConfig,
    check_batch_fits,
    make_optimizer,
    model_configs,
    model_grid,
    validate,
)
from tinymnist.algorithm.train import (
    FitResult,
    NonFiniteLoss,
    TestSet,
    Training,
    TrainState,
    evaluate_one,
    fit,
    initial_state,
)
from tinymnist.errors import TinyMnistError
from tinymnist.tool import checkpoint, extras, interrupts, outputs, torchrun
from tinymnist.tool.devices import resolve_device
from tinymnist.tool.memory import check_memory
from tinymnist.tool.report import LineReporter, MetricsFile, ProgressReporter, Reporters, final_line, target_line
from tinymnist.tool.sweep import Sweep
from tinymnist.tool.tensorboard import refuse_earlier_events, tensorboard_reporter
from tinymnist.transforms import first_conv, speed
from tinymnist.transforms.all_reduce import all_reduced
from tinymnist.transforms.vmap import evaluate_many

# What a resumed run takes from its checkpoint: what was trained. Where and how to run it (device,
# data, compile, output files) comes from the resuming command, so it writes only where that says.
TRAINED_FIELDS = (
    "model optimizer lr gamma schedule label_smoothing batch_size test_batch_size epochs seed log_interval seeds lrs"
).split()

# Of those, the ones a flag given now may replace that change the arithmetic (a note says so).
ARITHMETIC_FIELDS = "lr gamma schedule label_smoothing batch_size".split()


class Finished(Exception):
    """A resumed checkpoint that already holds every epoch asked for: nothing to train."""


def resumed_config(path: Path, flags: dict) -> tuple[TrainConfig, TrainState]:
    """The checkpoint's trained fields, overridden by the flags given now; its state on the CPU."""
    if not Path(path).exists():  # checked here, where the flag is known: eval and predict name their own
        raise TinyMnistError(f"--resume {path}: no such file; check the path, or leave --resume out to start anew")
    saved_config, state = checkpoint.load(path, torch.device("cpu"))
    for flag in ("model", "optimizer"):
        if flags.get(flag) is not None and flags[flag] != saved_config[flag]:
            raise TinyMnistError(
                f"--{flag} {flags[flag]} does not match checkpoint {path} ({saved_config[flag]}); leave it out"
            )
    trained = {k: saved_config[k] for k in TRAINED_FIELDS}
    config = TrainConfig(**{**trained, **{k: v for k, v in flags.items() if v is not None}})
    grid, saved_grid = model_grid(config), model_grid(TrainConfig(**trained))
    other_seeds = (config.seed, config.seeds) != (trained["seed"], trained["seeds"])  # its weights came from those
    # One --lr for a checkpoint of an --lr list: each of its models keeps its own rate.
    one_rate_for_many = flags.get("lr") is not None and flags.get("lrs") is None and trained["lrs"] is not None
    other_models = max(len(grid), len(saved_grid)) > 1 and grid != saved_grid  # N models: stacked in that order
    if other_seeds or one_rate_for_many or other_models:
        named = "--seed/--seeds do" if other_seeds else "--lr does"  # the same seeds: the rates differ
        raise TinyMnistError(f"{named} not match the models of checkpoint {path}; leave them out")
    validate(config)  # a flag given now (--epochs -3) is checked before it is compared
    one_cycle = config.schedule == trained["schedule"] == "one-cycle"
    if one_cycle and config.epochs != trained["epochs"]:  # every step's rate depends on the run's total steps
        raise TinyMnistError(
            f"--epochs {config.epochs}: checkpoint {path} follows a one-cycle schedule over "
            f"{trained['epochs']} epoch(s), which it cannot stretch; leave --epochs out"
        )
    if state.epoch >= config.epochs:
        more = f"pass --epochs {state.epoch + 1} or more to continue" if not one_cycle else "its one-cycle has ended"
        raise Finished(
            f"checkpoint {path} has completed {state.epoch} of --epochs {config.epochs}; nothing to train ({more})"
        )
    cluster = torchrun.from_env()
    if cluster is not None and not cluster.leader:
        return config, state  # the notes below come from rank 0
    for field in ARITHMETIC_FIELDS:  # allowed (a lower rate from here on, say), but no longer the same run
        if flags.get(field) is not None and flags[field] != trained[field]:
            flag = "--" + field.replace("_", "-")
            print(
                f"tinymnist: {flag} {flags[field]} replaces checkpoint {path}'s {trained[field]} from here on; "
                "the run no longer continues it bit for bit",
                file=sys.stderr,
            )
    return config, state


def train(config: TrainConfig, resumed: TrainState | None = None) -> FitResult:
    """Run `tinymnist train` for a config: check everything, lock the outputs, train, print the last line."""
    config = validate(config)
    cluster = torchrun.from_env()
    config = torchrun.this_process(config, cluster)  # under torchrun: its device; only rank 0 writes
    with torchrun.group(config, cluster):
        device = resolve_device(config.device)
        speed.use_tf32_matmuls(device)
        if config.threads:
            torch.set_num_threads(config.threads)
        check_compiler(config, device)
        if config.steps_per_call > 1 and (why := speed.several_steps_refused(config, device, cluster is None)):
            raise TinyMnistError(f"--steps-per-call {config.steps_per_call}: {why}; or leave it out")
        if config.steps_per_call > 1 and (error := speed.several_steps_cut_short(config)):
            raise TinyMnistError(error)
        paths = check_outputs(config)
        optimizer = make_optimizer(config)
        check_memory(config, optimizer, device, models_here(config, cluster))  # before N configs are built
        with outputs.exclusive(paths):  # a second run on these files refuses; a dead run's temp files go
            check_earlier_runs(config, paths, resumed)
            mnist = data.load_mnist(Path(config.data_dir), device, download=config.download)  # fetches what is missing
            check_batch_fits(config, len(mnist.train_images))
            batches = math.ceil(len(mnist.train_images) / config.batch_size)
            if config.steps_per_call > 1 and (error := speed.several_steps_cut_short(config, batches)):
                raise TinyMnistError(error)
            sweep = Sweep(config, cluster, mnist) if cluster and config.n_models > 1 else None
            models = sweep.models if sweep else model_configs(config)
            state = (
                sweep.start(optimizer, device, resumed) if sweep else start(config, optimizer, device, resumed, cluster)
            )
            data_parallel = None
            if cluster and not sweep:  # one model: each process takes a slice of every batch
                data_parallel = functools.partial(all_reduced, rank=cluster.rank, world_size=cluster.world_size)
            # Under torchrun a step waits for the others, so its timings say nothing of a taken core: fixed threads.
            step = speed.device_step(config, optimizer, device, data_parallel, adaptive_threads=cluster is None)
            evaluate = sweep or TestSet(config, models, mnist, evaluate_many if config.n_models > 1 else evaluate_one)
            k = speed.steps_per_call(config, device, one_process=cluster is None)  # as device_step chose
            training = Training(config, models, step, evaluate, steps_per_call=k)
            leads = cluster is None or cluster.leader  # only rank 0 writes outputs: the others' --save-model is None
            if resumed is not None and not config.save_model and not config.dry_run and leads:
                print(  # allowed (a look at more epochs), but easy to forget: said once nothing else can fail first
                    f"tinymnist: note: no --save-model, so this run's epochs are not saved (--save-model "
                    f"{config.resume} continues the checkpoint in place)",
                    file=sys.stderr,
                )
            result = train_and_save(training, mnist, state, paths.get("--metrics"), resumed, sweep)
        if sweep:  # the speed of the whole sweep: every share's images in the slowest share's time
            result.train_seconds, result.images = sweep.totals(result.train_seconds, result.images)
        compiled = speed.use_compile(config, device)
        if config.target_accuracy is not None:
            print(target_line(config.target_accuracy, result, compiled, resumed.epoch if resumed else None))
            saved = saved_at_target(config, result, resumed) if all(result.reached) and config.save_model else None
            if saved:
                print(saved)
        print(final_line(result, device, compiled))
    return result


def models_here(config: TrainConfig, cluster: torchrun.Cluster | None) -> int:
    """How many models this process trains: all, or under torchrun its share of a sweep."""
    if cluster is None or config.n_models == 1:
        return config.n_models
    rows = torchrun.share(config.n_models, cluster)
    return rows.stop - rows.start


def check_compiler(config: TrainConfig, device: torch.device) -> None:
    first_conv.environment_choice()  # a mistyped $TINYMNIST_FIRST_CONV: a one-line error now, not at the compile
    if config.compile:
        speed.check_compilable(device)
    elif config.compile is None and device.type == "cpu" and speed.cpu_compiler() is None:
        print("tinymnist: no C++ compiler here, so the step runs eager; install one to compile it", file=sys.stderr)


def check_outputs(config: TrainConfig) -> dict[str, Path]:
    """Every output path checked before any work (none may replace an input); the files to lock, by flag."""
    paths = {"--save-model": config.save_model, "--metrics": config.metrics}
    paths = {flag: Path(p) for flag, p in paths.items() if p}
    data_files = outputs.data_inputs(Path(config.data_dir))
    for flag, path in paths.items():
        inputs = dict(data_files)
        if config.resume and flag != "--save-model":  # --save-model may be it: a run continues in place
            inputs[Path(config.resume)] = "the checkpoint being resumed"
        outputs.check_output(path, flag, inputs)
    if config.tensorboard:
        extras.require("torch.utils.tensorboard", "--tensorboard")  # a missing extra is found now, not after loading
        outputs.check_output_folder(Path(config.tensorboard), "--tensorboard")
        if not config.resume:
            refuse_earlier_events(Path(config.tensorboard), "--tensorboard")
    return paths


def check_earlier_runs(config: TrainConfig, paths: dict[str, Path], resumed: TrainState | None) -> None:
    """A new run writes no file an earlier run left (its checkpoint, its metrics); a resumed run continues
    its own checkpoint in place and appends to a metrics file that ends where the checkpoint does. Checked
    once the files are locked: a run still writing them is named as such, not as an earlier run."""
    for flag, path in paths.items():
        if resumed is None or (flag == "--save-model" and not outputs.same_file(path, Path(config.resume))):
            outputs.refuse_an_earlier_run(path, flag)
        elif flag == "--metrics":
            outputs.check_continued_metrics(path, flag, resumed.epoch)


def start(config: TrainConfig, optimizer, device: torch.device, resumed: TrainState | None, cluster) -> TrainState:
    """Epoch 0 or the resumed checkpoint, on the device; under torchrun with this process's own dropout masks."""
    state = initial_state(config, optimizer, device) if resumed is None else checkpoint.to_device(resumed, device)
    return torchrun.own_dropout(state, config.seed, cluster, device) if cluster else state


def saved_at_target(config: TrainConfig, result: FitResult, resumed: TrainState | None) -> str | None:
    """Checkpoints hold whole epochs, so a target reached mid-epoch is not what --save-model holds: say what is."""
    reached, completed = max(r["epoch"] for r in result.reached), result.state.epoch
    trained_now = completed > (resumed.epoch if resumed else 0)
    if reached == completed and trained_now:
        return None  # the checkpoint is the network that reached the target
    where = f"the target was reached at epoch {reached:g}"
    if trained_now:
        return f"{where}; {config.save_model} holds epoch {completed}, the last completed one"
    return f"{where}; no epoch completed, so nothing was saved to {config.save_model}"


def train_and_save(
    training: Training,
    mnist: data.MNIST,
    state: TrainState,
    metrics_path: Path | None,
    resumed: TrainState | None,
    sweep: Sweep | None = None,
) -> FitResult:
    """fit, with each completed epoch checkpointed and a stop (NaN, Ctrl-C, SIGTERM) said truthfully."""
    config = training.config
    save = Saver(config, sweep, resumed)
    console = Console()
    reporters = [interrupts.SwallowedSignals(), ProgressReporter(console) if console.is_terminal else LineReporter()]
    written = []  # this run's --tensorboard writers and --metrics file
    # A dry run checks that the outputs can be written but writes none: a real history stays.
    if config.tensorboard and not config.dry_run:  # before --metrics is opened: a failure here leaves none
        written.append(tensorboard_reporter(config, len(mnist.train_images)))
    if metrics_path and not config.dry_run:
        written.append(MetricsFile(metrics_path, append=resumed is not None))
    # In this order: `trained` hears of a record before the files have it, and the files before the screen, so
    # a signal between two of them never removes a record that a file kept or the screen showed
    trained = TrainedEvaluations()
    reporter = Reporters(trained, *written, *reporters)
    try:
        with contextlib.closing(reporter):
            try:
                return fit(dataclasses.replace(training, reporter=reporter, on_epoch_end=save), mnist, state)
            except NonFiniteLoss as e:
                raise TinyMnistError(f"{e}{save.kept() or save.evaluations_kept(written, trained)}") from None
            except KeyboardInterrupt as stop:
                reporter.close()
                interrupts.report(stop, save.kept() or save.nothing_kept(written, trained))
                raise
    except BaseException:
        # A new run stopped before its first checkpoint, having evaluated nothing but the untrained network,
        # leaves no outputs: the same command would refuse them as an earlier run's. Trained evaluations stay.
        if resumed is None and config.save_model and not save.saved and not trained.seen:
            for output in written:
                output.discard()
        raise


class TrainedEvaluations:
    """A reporter that remembers whether the run has evaluated trained weights (an epoch past 0)."""

    def __init__(self):
        self.seen = False

    def epoch_started(self, *args, **kwargs) -> None: ...
    def logged(self, *args) -> None: ...

    def evaluated(self, record: dict) -> None:
        self.seen = self.seen or record["epoch"] > 0

    def close(self) -> None: ...


class Saver:
    """fit's on_epoch_end: each completed epoch to --save-model, atomically; remembers what it saved."""

    def __init__(self, config: TrainConfig, sweep: Sweep | None, resumed: TrainState | None):
        self.config, self.sweep, self.resumed = config, sweep, resumed
        self.saved = []  # epochs this run has checkpointed

    def __call__(self, state: TrainState) -> None:
        if self.sweep:  # every rank sends its share; rank 0 saves all N
            state = self.sweep.gathered(state)
        if self.config.save_model:
            with interrupts.shielded():  # a signal now waits until the file and `saved` agree
                checkpoint.save(Path(self.config.save_model), self.config.to_dict(), state)
                self.saved.append(state.epoch)

    def kept(self) -> str:
        """What survives a stopped run."""
        if self.saved:
            return f"; the checkpoint of epoch {self.saved[-1]} is kept in {self.config.save_model}"
        return ""

    def nothing_kept(self, written: list, trained: TrainedEvaluations) -> str:
        """A stop before this run saved anything: what is still on disk."""
        if self.resumed is not None:
            return f"; no epoch completed in this run; {self.config.resume} (epoch {self.resumed.epoch}) is unchanged"
        if torchrun.launched() and not self.config.save_model:
            return ""  # not rank 0: the leader says what is saved
        if not self.config.save_model:
            return "; no --save-model, nothing saved"
        return self.evaluations_kept(written, trained) or "; no epoch completed, nothing saved"

    def evaluations_kept(self, written: list, trained: TrainedEvaluations) -> str:
        """A new run's trained evaluations, kept though no checkpoint is: where they are."""
        if self.resumed is not None or not self.config.save_model or not trained.seen or not written:
            return ""
        kept = " and ".join(str(output.path) for output in written)
        return f"; no epoch completed, so no checkpoint; its evaluations are kept in {kept}"
