"""transforms/side_by_side.py: N models' gradients on a pool of threads, against each model's single step.

The oracle is N single runs: each model's step, as `train` runs one model, from the same
parameters and batch, on one thread, as a side-by-side model's gradient runs: on two threads
oneDNN and inductor split sums otherwise, and RMSprop and Adam, which divide each gradient by its
own running size, make that rounding a visible share of the learning rate for a weight whose
gradient is near 0 (lenet's conv2: 2.9e-5 on an AMD EPYC). What is left is the update compiled
with the gradient in one graph against apart: 1.5e-8 in fast's parameters.
"""

import dataclasses
import threading
import time

import pytest
import torch

from tests.support import needs_cpp_compiler, random_mnist
from tinymnist.algorithm import networks
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import per_model
from tinymnist.transforms import direct_call, speed
from tinymnist.transforms.side_by_side import draws_random_numbers, models_on_cores
from tinymnist.transforms.speed import device_step
from tinymnist.transforms.vmap import one_model
from tinymnist.transforms.wide_conv import CHOSEN, SIDE_BY_SIDE

CPU = torch.device("cpu")
N = 4  # two rounds of a model per thread on 2 threads
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}  # float32 rounding of the same sums, fused otherwise


def test_side_by_side_is_chosen_only_for_networks_without_random_numbers():
    """Dropout draws from torch's one generator: threads would draw in no fixed order."""
    assert draws_random_numbers("cnn") and not draws_random_numbers("fast")
    chosen = [model for (device_type, model), rule in CHOSEN.items() if rule == SIDE_BY_SIDE]
    assert chosen and all(device_type == "cpu" for (device_type, _), rule in CHOSEN.items() if rule == SIDE_BY_SIDE)
    assert not any(draws_random_numbers(model) for model in chosen)


@needs_cpp_compiler
@pytest.mark.parametrize(("model", "micro_batch"), [("fast", 0), ("fast", 3), ("lenet", 3)])
def test_models_side_by_side_are_n_single_steps(model, micro_batch, caller_threads, monkeypatch):
    """fast and lenet on the CPU (wide_conv.CHOSEN: side by side): the N-model step device_step
    builds is each model's own single step, whole or in the same micro-batches (8 images in
    chunks of 3, 3 and 2), twice; its gradient is called directly (direct_call.py), and the second
    call compiles nothing more (a compile on a worker would race the other workers' calls)."""
    assert CHOSEN[("cpu", model)] == SIDE_BY_SIDE
    caller_threads(2)
    built = spy_on_models_on_cores(monkeypatch)
    compiles = []
    compiled_graph = direct_call.compiled_graph

    def counted(fn, layout, flat, options):  # what direct_call compiles: which function, for the C++ wrapper, where
        compiles.append((fn.__name__, options.get("cpp_wrapper", False), threading.current_thread()))
        return compiled_graph(fn, layout, flat, options)

    monkeypatch.setattr(direct_call, "compiled_graph", counted)
    config = recipe_config(model, batch_size=8, seeds=N, compile=True, micro_batch=micro_batch)
    optimizer = make_optimizer(config)
    data = random_mnist(64, 1, seed=0)
    images, labels = data.train_images, data.train_labels
    batch_idx = torch.randint(0, 64, (N, 8), generator=torch.Generator().manual_seed(0))  # (N, B)
    params = per_model([networks.init_params(model, seed) for seed in range(N)], stacked=True)
    opt_state = per_model([optimizer.init(one_model(params, i)) for i in range(N)], stacked=True)
    lr = torch.full((N,), 0.01)
    step = device_step(config, optimizer, CPU)
    assert built == [2]  # side by side, not a fallback
    single = device_step(dataclasses.replace(config, seeds=1), optimizer, CPU, adaptive_threads=False)
    for turn in range(2):  # the first call compiles (model 0 on the caller), the second only runs
        compiled_before = len(compiles)  # the single steps below compile too
        new_params, new_state, losses = step(params, opt_state, images, labels, batch_idx.roll(turn, 1), lr)
        # All on this thread, in the first call: the gradient without the GIL for each chunk size, then the update.
        chunk_sizes = 2 if micro_batch else 1  # chunks of 3, 3 and 2, or the whole batch
        caller = threading.current_thread()
        expected = [("gradient", True, caller)] * chunk_sizes + [("update", False, caller)] if turn == 0 else []
        assert compiles[compiled_before:] == expected
        for i in range(N):
            args = (one_model(params, i), one_model(opt_state, i), images, labels, batch_idx[i].roll(turn), lr[i])
            caller_threads(1)  # the model's single step on one thread, as its gradient ran side by side
            own_params, own_state, own_loss = single(*args)
            caller_threads(2)
            torch.testing.assert_close(one_model(new_params, i), own_params, **TOLERANCE)
            torch.testing.assert_close(one_model(new_state, i), own_state, **TOLERANCE)
            torch.testing.assert_close(losses[i], own_loss, **TOLERANCE)
        params, opt_state = new_params, new_state


def spy_on_models_on_cores(monkeypatch) -> list[int]:
    """The worker counts device_step builds models_on_cores with, one entry a build."""
    built = []

    def spy(gradient, workers):
        built.append(workers)
        return models_on_cores(gradient, workers)

    monkeypatch.setattr(speed, "models_on_cores", spy)
    return built


@needs_cpp_compiler
@pytest.mark.parametrize(("threads", "n_models", "side_by_side"), [(2, 4, True), (2, 3, False), (1, 4, False)])
def test_side_by_side_only_in_whole_rounds_of_a_model_per_thread(
    caller_threads, monkeypatch, threads, n_models, side_by_side
):
    """3 models on 2 threads leave a core idle every other round (fast: 0.85x one at a time's
    speed), and one thread has nothing to share out: both run the models one at a time."""
    caller_threads(threads)
    built = spy_on_models_on_cores(monkeypatch)
    config = recipe_config("fast", batch_size=8, seeds=n_models, compile=True)
    device_step(config, make_optimizer(config), CPU)  # built, not called: nothing compiles
    assert built == ([threads] if side_by_side else [])


@pytest.fixture
def caller_threads():
    """Sets the calling thread's torch thread count for a test, and puts the old one back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_each_model_runs_on_one_thread_and_comes_back_in_its_place(caller_threads):
    """The first call runs model 0 on the caller, set to one thread for it (the compile, where
    Ctrl-C reaches it); the rest go to the workers, one OpenMP thread each. They finish out of
    order here (the later ones sleep less), yet the result is in model order, and the caller
    keeps its own thread count."""
    caller_threads(2)
    seen = {}

    def gradient(params, images, labels, batch_idx):
        i = int(batch_idx[0])
        time.sleep(0.01 * (5 - i))  # model 1 sleeps longest of those run side by side
        seen[i] = (threading.current_thread(), torch.get_num_threads())
        return {"w": params["w"] * 2}, params["w"].sum()

    gradients = models_on_cores(gradient, workers=2)
    params = {"w": torch.arange(15.0).view(5, 3)}  # (N, 3)
    batch_idx = torch.arange(5).unsqueeze(1)  # (N, 1): model i's batch is [i]
    grads, losses = gradients(params, None, None, batch_idx)
    torch.testing.assert_close(grads["w"], params["w"] * 2, rtol=0, atol=0)
    torch.testing.assert_close(losses, params["w"].sum(dim=1), rtol=0, atol=0)
    assert seen[0] == (threading.current_thread(), 1)
    workers = {seen[i][0] for i in range(1, 5)}
    assert all(seen[i][1] == 1 for i in range(1, 5)) and len(workers) == 2  # both workers, one thread each
    assert all(worker.name.startswith("tinymnist-model") for worker in workers)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("threads", "expected"), [(2, 2), (1, 1), (4, 2)])
def test_as_many_models_run_at_once_as_the_caller_has_threads(caller_threads, threads, expected):
    """AdaptiveThreads moves the caller to one thread while another program takes a core: then
    the models run one at a time too; never more at once than there are workers."""
    caller_threads(threads)
    running, most, lock = [0], [0], threading.Lock()

    def gradient(params, images, labels, batch_idx):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return {"w": params["w"]}, params["w"].sum()

    gradients = models_on_cores(gradient, workers=2)
    gradients({"w": torch.zeros(7, 2)}, None, None, torch.arange(7).unsqueeze(1))
    assert most[0] == expected


def test_an_error_in_one_model_reaches_the_caller_and_stops_the_other_lanes(caller_threads):
    """Model 2 fails while model 1 runs on the other lane: the caller gets the error, and neither
    lane starts a model after it (3, 4 and 5 never run)."""
    caller_threads(2)
    started = []

    def gradient(params, images, labels, batch_idx):
        i = int(batch_idx[0])
        started.append(i)
        if i == 1:
            time.sleep(0.2)  # still running when model 2 fails
        if i == 2:
            raise RuntimeError("model 2 failed")
        return {"w": params["w"]}, params["w"].sum()

    gradients = models_on_cores(gradient, workers=2)
    with pytest.raises(RuntimeError, match="model 2 failed"):
        gradients({"w": torch.zeros(6, 2)}, None, None, torch.arange(6).unsqueeze(1))
    time.sleep(0.3)  # a lane that went on would have started model 3 by now
    assert sorted(started) == [0, 1, 2]
