"""Several steps per call: the same parameters as one step per call, and a loop that hands
the step its steps up to each log line, evaluation and epoch end."""

import dataclasses
import itertools

import pytest
import torch

from tests.support import assert_user_error, fit_run, needs_cpp_compiler, random_mnist, run, train_args
from tinymnist.algorithm import optim
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.tool import checkpoint
from tinymnist.transforms import first_conv, speed
from tinymnist.transforms.cpu_threads import AdaptiveThreads
from tinymnist.transforms.several_steps import SeveralSteps, unrolled
from tinymnist.transforms.speed import device_step, steps_per_call

CPU = torch.device("cpu")


def batches(k: int, n_images: int = 256, model: str = "mlp3"):
    config = recipe_config(model)
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, CPU)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n_images,), generator=g)
    batch_idx = torch.randint(0, n_images, (k, config.batch_size), generator=g)  # (k, B)
    lr = torch.linspace(1e-3, 2e-3, k)  # (k,): a rate per step, as a schedule gives
    return config, optimizer, state, images, labels, batch_idx, lr


def one_at_a_time(step, params, opt_state, images, labels, batch_idx, lr):
    total = 0.0
    for idx, rate in zip(batch_idx, lr, strict=True):
        params, opt_state, loss = step(params, opt_state, images, labels, idx, rate)
        total = total + loss
    return params, opt_state, total


@needs_cpp_compiler
@pytest.mark.parametrize("model", ["mlp3", "fast", "cnn"])
def test_k_steps_in_one_compiled_graph_are_k_compiled_steps_bit_for_bit(model, monkeypatch):
    """The k-step graph is the step's own graph k times: the CPU computes the same numbers. Built as train
    builds it (C++ wrapper; mlp3 called directly); fast: its first block as one product (polyphase.py) in
    every step; cnn: first_conv.py's rewrite (pinned), and dropout's masks drawn in it (dropout_mask.py)."""
    monkeypatch.setenv(first_conv.CHOICE_ENV, "always")
    _, optimizer, state, images, labels, batch_idx, lr = batches(k=4, model=model)
    config = recipe_config(model, compile=True, micro_batch=0, steps_per_call=4)
    several = device_step(config, optimizer, CPU, adaptive_threads=False)
    assert isinstance(several, SeveralSteps)
    torch.manual_seed(0)  # the generator dropout draws from, the same for both
    got = several(state.params, state.opt_state, images, labels, batch_idx, lr)
    torch.manual_seed(0)
    expected = one_at_a_time(several.one, state.params, state.opt_state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got[:2], expected[:2], rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=0)  # the sum of 4 losses, in another order


@needs_cpp_compiler
def test_the_k_step_graph_is_compiled_as_one_unrolled_graph_with_the_cpp_wrapper(monkeypatch):
    """Compiled, not run: what device_step hands the compiler for k steps, and for one."""
    handed = []
    monkeypatch.setattr(speed, "compiled", lambda fn, direct=False, cpp_wrapper=False: handed.append(cpp_wrapper) or fn)
    config = recipe_config("mlp3", compile=True, steps_per_call=3)
    optimizer = make_optimizer(config)
    several = device_step(config, optimizer, CPU, adaptive_threads=False)
    assert handed == [False, True]  # the single step, then the k-step graph
    _, _, state, images, labels, batch_idx, lr = batches(k=3)
    several.compiled = True
    got = several(state.params, state.opt_state, images, labels, batch_idx, lr)  # eager: the unrolled function
    step = make_step(make_gradient(config), optimizer)
    expected = one_at_a_time(step, state.params, state.opt_state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_unrolled_runs_each_row_as_a_step():
    config, optimizer, state, images, labels, batch_idx, lr = batches(k=3)
    step = make_step(make_gradient(config), optimizer)
    got = unrolled(step, 3)(state.params, state.opt_state, images, labels, batch_idx, lr)
    expected = one_at_a_time(step, state.params, state.opt_state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_shorter_call_runs_the_single_step_n_times():
    config, optimizer, state, images, labels, batch_idx, lr = batches(k=3)
    step = make_step(make_gradient(config), optimizer)
    several = SeveralSteps(step, lambda *args: pytest.fail("the k-step graph is for exactly k steps"), k=10)
    several.compiled = True  # past the first call's warm-up of both paths (tested below)
    got = several(state.params, state.opt_state, images, labels, batch_idx, lr)
    expected = one_at_a_time(step, state.params, state.opt_state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in records]


@pytest.mark.parametrize("n", [3, 10])
def test_the_first_call_compiles_both_paths_and_leaves_the_random_state_as_its_own(n):
    """A compile later on would fall inside the loop's clock; the thrown-away call draws no
    random numbers that the run then misses (dropout)."""
    config, _, state, images, labels, batch_idx, lr = batches(k=n)
    calls = []

    def path(name):
        def run_path(params, opt_state, images, labels, idx, rate):
            calls.append((name, tuple(idx.shape)))
            torch.rand(1)  # as dropout draws
            return params, opt_state, torch.zeros(())

        return run_path

    several = SeveralSteps(path("one"), path("several"), k=10)
    torch.manual_seed(0)
    several(state.params, state.opt_state, images, labels, batch_idx, lr)
    after = torch.rand(1)
    taken = ["several"] if n == 10 else ["one"] * n
    torch.manual_seed(0)
    for _ in taken:
        torch.rand(1)
    assert torch.equal(after, torch.rand(1))  # the state the path taken left
    assert sorted({name for name, _ in calls}) == ["one", "several"]
    assert ("several", (10, config.batch_size)) in calls


class Recorder:
    """A step that records how many steps each call took, and runs them one at a time."""

    def __init__(self, step, k: int):
        self.step, self.k, self.calls = step, k, []

    def __call__(self, params, opt_state, images, labels, batch_idx, lr):
        if self.k == 1:
            self.calls.append(1)
            return self.step(params, opt_state, images, labels, batch_idx, lr)
        self.calls.append(len(batch_idx))
        return one_at_a_time(self.step, params, opt_state, images, labels, batch_idx, lr)


@pytest.mark.parametrize("eval_every", [None, 7])
def test_the_loop_hands_over_the_steps_up_to_each_log_line_and_evaluation(eval_every):
    """13 steps an epoch (100 images in batches of 8), log every 5, k = 4: calls of 4, then 1
    to the log line; the epoch's last 3 alone; with --eval-every 7 a call ends there too. The
    final state and the records are those of one step per call (the train loss to rounding)."""
    data = random_mnist(100, 50)
    config = dataclasses.replace(
        recipe_config("mlp3", "adam"), batch_size=8, epochs=2, log_interval=5, eval_every=eval_every
    )
    optimizer = optim.OPTIMIZERS["adam"]()
    step = make_step(make_gradient(config), optimizer)
    runs = {}
    for k in (1, 4):
        recorder = Recorder(step, k)
        result = fit_run(config, data, initial_state(config, optimizer, CPU), recorder, steps_per_call=k)
        runs[k] = (recorder.calls, result)
    calls = runs[4][0]
    ends = list(itertools.accumulate(calls))
    assert sum(calls) == 26 and max(calls) == 4
    for boundary in [5, 10, 13, 18, 23, 26] + ([7] if eval_every else []):
        assert boundary in ends  # no call runs past a log line, an evaluation or an epoch's end
    for several, single in zip(without_timings(runs[4][1].records), without_timings(runs[1][1].records), strict=True):
        # a log interval split over calls adds its losses in another grouping: the last bits may differ
        several_loss, single_loss = several.pop("train_loss", None), single.pop("train_loss", None)
        assert several_loss == single_loss or several_loss == pytest.approx(single_loss, rel=1e-6)
        assert several == single
    torch.testing.assert_close(runs[4][1].state.params, runs[1][1].state.params, rtol=0, atol=0)
    assert runs[4][1].images == runs[1][1].images - 3 * 8  # the first call (it compiles) is off the clock


def test_steps_per_call_is_for_one_models_step_compiled_whole_on_the_cpu():
    mlp3 = recipe_config("mlp3", compile=True, steps_per_call=10)
    assert steps_per_call(mlp3, CPU) == 10
    assert steps_per_call(recipe_config("mlp3", compile=True), CPU) == 1  # the default: one
    assert steps_per_call(dataclasses.replace(mlp3, compile=False), CPU) == 1
    assert steps_per_call(dataclasses.replace(mlp3, seeds=2), CPU) == 1  # N models: one call is N steps already
    assert steps_per_call(mlp3, CPU, one_process=False) == 1  # torchrun: the all-reduce stays per step
    assert steps_per_call(dataclasses.replace(mlp3, micro_batch=5), CPU) == 1  # micro-batches: compiled in pieces
    assert steps_per_call(mlp3, torch.device("cuda")) == 1  # CUDA graphs replay a step with one launch
    assert steps_per_call(dataclasses.replace(mlp3, dry_run=True), CPU) == 1  # one step: no k-step graph


@needs_cpp_compiler
def test_several_steps_per_call_stay_on_fixed_threads():
    """Each thread count compiles its own k-step graph, up to a minute: not mid-run (built, not called)."""
    torch.set_num_threads(2)  # conftest restores the count
    config = recipe_config("mlp3", compile=True)
    assert isinstance(device_step(config, make_optimizer(config), CPU), AdaptiveThreads)  # the control: k = 1
    several = dataclasses.replace(config, steps_per_call=10)
    assert isinstance(device_step(several, make_optimizer(several), CPU), SeveralSteps)


@needs_cpp_compiler
def test_train_with_steps_per_call_ends_where_train_without_does(tiny_split, tmp_path):
    """The CLI end to end: the same checkpoint, bit for bit (on fixed threads, so that nothing but the
    calls differ; the logged losses are summed in other groups, so may differ in the last digits)."""
    common = ("--model", "mlp3", "--epochs", 1, "--compile", "--threads", 2, "--log-interval", 10)
    for name, extra in (("one", ()), ("several", ("--steps-per-call", 5))):
        result = run(*train_args(tiny_split, *common, *extra, "--save-model", tmp_path / f"{name}.pt"))
        assert result.exit_code == 0, result.output
    _, one = checkpoint.load(tmp_path / "one.pt", CPU)
    _, several = checkpoint.load(tmp_path / "several.pt", CPU)
    torch.testing.assert_close(several.params, one.params, rtol=0, atol=0)
    torch.testing.assert_close(several.opt_state, one.opt_state, rtol=0, atol=0)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (("--steps-per-call", 0), "positive"),
        (("--steps-per-call", 4, "--no-compile"), "--compile"),
        pytest.param(("--steps-per-call", 4, "--compile", "--seeds", 2), "a single model", marks=needs_cpp_compiler),
        pytest.param(
            ("--steps-per-call", 4, "--compile", "--micro-batch", 5), "--micro-batch 0", marks=needs_cpp_compiler
        ),
        # where a call ends before k steps, every time: k would be compiled and never run
        pytest.param(("--steps-per-call", 20, "--compile"), "--log-interval 10 ends it", marks=needs_cpp_compiler),
        pytest.param(
            ("--steps-per-call", 10, "--compile", "--eval-every", 5), "--eval-every 5 ends it", marks=needs_cpp_compiler
        ),
        pytest.param(  # 600 images in batches of 15
            ("--steps-per-call", 50, "--compile", "--log-interval", 100),
            "an epoch of 40 batches ends it",
            marks=needs_cpp_compiler,
        ),
    ],
)
def test_steps_per_call_where_it_cannot_apply_is_refused_saying_why(tiny_split, extra, fragment):
    assert_user_error(run(*train_args(tiny_split, "--model", "mlp3", *extra)), "--steps-per-call", fragment)


@needs_cpp_compiler
def test_steps_per_call_past_the_log_interval_is_refused_before_the_data_is_read(tmp_path):
    args = train_args(tmp_path / "no-data", "--model", "mlp3", "--compile", "--steps-per-call", 20)
    remedy = "pass --steps-per-call 10 or fewer, or a larger --log-interval"
    assert_user_error(run(*args), "--steps-per-call 20", remedy)
