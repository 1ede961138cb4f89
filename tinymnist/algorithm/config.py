"""The tutorials' recipes, and `TrainConfig`, the frozen description of a run: one field per CLI flag.

Each model's defaults are its tutorial's recipe (README.md, "The recipes"). `validate` is the
one check of a config, the CLI's or a checkpoint's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tinymnist.algorithm import networks, optim
from tinymnist.errors import TinyMnistError


@dataclass(frozen=True)
class Recipe:
    """A tutorial's hyperparameters: the defaults of `tinymnist train --model NAME`."""

    optimizer: str
    lr: float
    gamma: float  # StepLR factor applied after every epoch; 1.0 = constant rate
    batch_size: int
    test_batch_size: int
    epochs: int
    mean: float  # input scaling: x = (pixel / 255 - mean) / std
    std: float
    tutorial: str  # where the numbers come from
    schedule: str = "step"  # "step": StepLR by gamma each epoch; "one-cycle": OneCycleLR peaking at lr
    label_smoothing: float = 0.0  # of the training loss (cross-entropy only)
    betas: tuple[float, float] | None = None  # Adam's, where the recipe sets them; None: torch.optim's


RECIPES: dict[str, Recipe] = {
    # torchvision's Normalize((0.5,), (0.5,)) maps 0..1 to -1..1.
    "mlp": Recipe("adam", 1e-3, 1.0, 64, 1000, 5, 0.5, 0.5, "a PyTorch beginner's tutorial"),
    # ToTensor() alone: pixels in 0..1.
    "mlp3": Recipe("adam", 1e-3, 1.0, 15, 1000, 2, 0.0, 1.0, 'a "zero to neural net" tutorial'),
    # pytorch/examples mnist: MNIST's own pixel mean and standard deviation.
    "cnn": Recipe("adadelta", 1.0, 0.7, 64, 1000, 14, 0.1307, 0.3081, "pytorch/examples mnist/main.py"),
    "lenet": Recipe("rmsprop", 1e-3, 1.0, 8192, 8192, 50, 0.0, 1.0, "a LeNet tutorial"),
    # Built for time to 99%: tuomaso/train_mnist_fast's network and Adam settings, CIFAR-10
    # speedruns' label smoothing, a second one-cycle epoch (README.md, "Time to 99%"). One
    # 10,000-image evaluation chunk: on a GPU an evaluation is one pass.
    "fast": Recipe(
        "adam",
        0.01,
        1.0,
        256,
        10000,
        2,
        0.1307,
        0.3081,
        "tuomaso/train_mnist_fast, tuned here",
        schedule="one-cycle",
        label_smoothing=0.1,
        betas=(0.7, 0.9),
    ),
}

SCHEDULES = ("step", "one-cycle")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Field names are the CLI flags."""

    model: str = "cnn"
    optimizer: str = "adadelta"
    lr: float = 1.0  # learning rate of epoch 1 (StepLR), or the peak of a one-cycle schedule
    gamma: float = 0.7  # multiply lr by gamma after every epoch (StepLR, step_size 1)
    schedule: str = "step"  # "step" (StepLR by gamma) or "one-cycle" (OneCycleLR, peak lr)
    label_smoothing: float = 0.0  # of the training loss; 0: plain cross-entropy / NLL
    batch_size: int = 64  # training images per step; fixed, so the step compiles once
    test_batch_size: int = 1000  # images per evaluation chunk
    epochs: int = 14  # total epochs; a resumed run continues up to this number
    seed: int = 1  # seeds parameter init, shuffling and dropout; 0 <= seed < 2**63
    log_interval: int = 10  # steps between log lines (and the only host syncs)
    dry_run: bool = False  # one step and one evaluation, to check the setup
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    compile: bool | None = None  # None: the faster choice for the device kind
    micro_batch: int | None = None  # images per gradient chunk; 0: whole batch; None: the device's default
    cuda_graphs: bool = True  # on CUDA, replay each step as one CUDA graph (transforms/cuda_graph.py)
    threads: int | None = None  # CPU threads, fixed; None: torch's, fewer while a core is taken (cpu_threads.py)
    steps_per_call: int = 1  # CPU: steps per compiled call (transforms/several_steps.py)
    data_dir: str = "data"
    download: bool = True  # fetch missing MNIST files before training
    save_model: str | None = None  # checkpoint path, rewritten at every epoch end
    metrics: str | None = None  # JSON Lines path, one object per evaluation
    resume: str | None = None  # checkpoint to continue from
    tensorboard: str | None = None  # folder for TensorBoard event files (the viz extra)
    target_accuracy: float | None = None  # stop at the first evaluation at or above this fraction
    eval_every: int | None = None  # steps between evaluations; None: once per epoch
    # N models at once (transforms/vmap.py): seeds seed .. seed+seeds-1, for each rate in lrs.
    seeds: int = 1  # consecutive seeds, one model each
    lrs: list[float] | None = None  # a learning-rate sweep, one model per rate and seed; None: just lr

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.model]

    @property
    def n_models(self) -> int:
        """Models trained at once: --seeds times the --lr list. More than one are stacked (vmap)."""
        return self.seeds * len(self.lrs or [self.lr])

    def to_dict(self) -> dict:
        """Plain str/int/float/bool/None values: what a checkpoint stores."""
        return dataclasses.asdict(self)


def recipe_config(model: str, optimizer: str | None = None, **overrides) -> TrainConfig:
    """The config for `model` with its recipe as defaults; None overrides are ignored."""
    networks.check_model(model)
    recipe = RECIPES[model]
    optimizer = optimizer or recipe.optimizer
    # --optimizer other than the recipe's: that optimizer's torch default lr (an unknown name keeps
    # the recipe's here, and validate() refuses it)
    lr = recipe.lr if optimizer == recipe.optimizer else optim.DEFAULT_LR.get(optimizer, recipe.lr)
    defaults = {"model": model, "optimizer": optimizer, "lr": lr}
    for name in ("gamma", "batch_size", "test_batch_size", "epochs", "schedule", "label_smoothing"):
        defaults[name] = getattr(recipe, name)
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**defaults)


def make_optimizer(config: TrainConfig):
    """The config's optimizer, with the recipe's hyperparameters when it is the recipe's own."""
    own = config.optimizer == config.recipe.optimizer and config.recipe.betas is not None
    return optim.OPTIMIZERS[config.optimizer](**({"betas": config.recipe.betas} if own else {}))


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer; vmapped runs add to it


def validate(config: TrainConfig) -> TrainConfig:
    """Raise a one-line TinyMnistError naming the flag for any value training cannot use."""
    networks.check_model(config.model)
    if config.optimizer not in optim.OPTIMIZERS:
        known = ", ".join(optim.OPTIMIZERS)
        raise TinyMnistError(f"--optimizer {config.optimizer!r} is unknown; choose one of {known}")
    numbers = {
        "--batch-size": config.batch_size,
        "--test-batch-size": config.test_batch_size,
        "--epochs": config.epochs,
        "--log-interval": config.log_interval,
        "--seed": config.seed,
    }
    for flag, value in numbers.items():
        if not _whole(value):
            raise TinyMnistError(f"{flag} must be a whole number, got {value!r}")
    for flag, value in {"--lr": config.lr, "--gamma": config.gamma}.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TinyMnistError(f"{flag} must be a number, got {value!r}")
    for flag in ("--batch-size", "--test-batch-size", "--epochs", "--log-interval"):
        if not numbers[flag] > 0:
            raise TinyMnistError(f"{flag} must be positive, got {numbers[flag]}")
    for flag, value in {"--lr": config.lr, "--gamma": config.gamma}.items():
        if not value > 0 or value == float("inf"):  # also catches NaN
            raise TinyMnistError(f"{flag} must be positive and finite, got {value}")
    if config.schedule not in SCHEDULES:
        raise TinyMnistError(f"--schedule {config.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if not 0 <= config.label_smoothing < 1:
        raise TinyMnistError(f"--label-smoothing must be at least 0 and below 1, got {config.label_smoothing}")
    if config.target_accuracy is not None and not 0 < config.target_accuracy <= 1:
        raise TinyMnistError(
            f"--target-accuracy is a fraction above 0 and at most 1 (0.99 for 99%), got {config.target_accuracy}"
        )
    if config.eval_every is not None and (not _whole(config.eval_every) or config.eval_every < 1):
        raise TinyMnistError(f"--eval-every must be a positive number of steps, got {config.eval_every}")
    if not 0 <= config.seed <= MAX_SEED:
        raise TinyMnistError(f"--seed must be between 0 and 2**63-1, got {config.seed}")
    if config.micro_batch is not None and (not isinstance(config.micro_batch, int) or config.micro_batch < 0):
        raise TinyMnistError(f"--micro-batch must be 0 (whole batch) or positive, got {config.micro_batch}")
    if not isinstance(config.steps_per_call, int) or config.steps_per_call < 1:
        raise TinyMnistError(f"--steps-per-call must be a positive number of steps, got {config.steps_per_call}")
    if config.threads is not None and (not isinstance(config.threads, int) or config.threads < 1):
        raise TinyMnistError(f"--threads must be a positive number of CPU threads, got {config.threads}")
    validate_models(config)
    return config


def _whole(value) -> bool:
    """An int and not a bool (True is an int to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def validate_models(config: TrainConfig) -> None:
    """--seeds and a --lr list: at least one model, seeds in range, every rate usable and distinct."""
    if not _whole(config.seeds) or config.seeds < 1:
        raise TinyMnistError(f"--seeds must be a whole number of models, 1 or more, got {config.seeds!r}")
    if config.seed + config.seeds - 1 > MAX_SEED:
        raise TinyMnistError(f"--seed {config.seed} with --seeds {config.seeds} runs past 2**63-1; lower either")
    if config.lrs is not None:
        if not isinstance(config.lrs, list) or not config.lrs:
            raise TinyMnistError(f"--lr must list at least one learning rate, got {config.lrs!r}")
        for lr in config.lrs:
            if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < float("inf"):
                raise TinyMnistError(f"--lr: every learning rate must be positive and finite, got {lr!r}")
        shown = [f"{lr:g}" for lr in config.lrs]  # as logs and TensorBoard folders name each model
        if len(set(shown)) != len(shown):
            raise TinyMnistError(f"--lr lists a learning rate twice ({', '.join(shown)}); give each once")


def model_grid(config: TrainConfig) -> list[tuple[float, int]]:
    """Every (lr, seed) pair the config trains, one model each, rate-major; one pair for a single run."""
    return [(lr, seed) for lr in config.lrs or [config.lr] for seed in range(config.seed, config.seed + config.seeds)]


def model_configs(config: TrainConfig) -> list[TrainConfig]:
    """Each model's own config, in the order the models are stacked: the run `--seed s --lr l` alone."""
    return [dataclasses.replace(config, lr=lr, seed=seed, seeds=1, lrs=None) for lr, seed in model_grid(config)]


def parse_lrs(text: str) -> list[float]:
    """`--lr 0.5,1,2` as [0.5, 1.0, 2.0], or a one-line error naming the bad item."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            what = "an empty item" if not item.strip() else f"{item.strip()!r}, not a number"
            raise TinyMnistError(f"--lr {text}: {what}; give learning rates like --lr 0.5,1,2") from None
        if not 0 < rate < float("inf"):  # also NaN
            raise TinyMnistError(f"--lr {text}: {item.strip()} is not a positive, finite learning rate")
        rates.append(rate)
    return rates


def check_batch_fits(config: TrainConfig, n_train: int) -> None:
    """A batch larger than the training set has no epoch to shuffle into: say so before training."""
    if config.batch_size > n_train:
        raise TinyMnistError(
            f"--batch-size {config.batch_size} is more than the {n_train} training images; use at most {n_train}"
        )
