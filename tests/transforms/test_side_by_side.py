"""transforms/side_by_side.py: N models' gradients on a pool of threads, against each model's single step.

The oracle is N single runs: each model's step, as `train` runs one model, from the same
parameters and batch. Tolerances are float32 reassociation: a side-by-side model runs on one
OpenMP thread, the single step on torch's, and inductor may split a sum between threads.
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
from tinymnist.transforms.side_by_side import draws_random_numbers, side_by_side
from tinymnist.transforms.speed import device_step
from tinymnist.transforms.vmap import one_model
from tinymnist.transforms.wide_conv import CHOSEN, SIDE_BY_SIDE

CPU = torch.device("cpu")
N = 3
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def test_side_by_side_is_chosen_only_for_networks_without_random_numbers():
    """Dropout draws from torch's one generator: threads would draw in no fixed order."""
    assert draws_random_numbers("cnn") and not draws_random_numbers("fast")
    chosen = [model for (device_type, model), rule in CHOSEN.items() if rule == SIDE_BY_SIDE]
    assert chosen and all(device_type == "cpu" for (device_type, _), rule in CHOSEN.items() if rule == SIDE_BY_SIDE)
    assert not any(draws_random_numbers(model) for model in chosen)


@needs_cpp_compiler
@pytest.mark.parametrize(("model", "micro_batch"), [("fast", 0), ("fast", 3), ("lenet", 3)])
def test_models_side_by_side_are_n_single_steps(model, micro_batch):
    """fast and lenet on the CPU (wide_conv.CHOSEN: side by side): the N-model step device_step
    builds is each model's own single step, in the same micro-batches (8 images in chunks of 3, 3
    and 2), twice."""
    assert CHOSEN[("cpu", model)] == SIDE_BY_SIDE
    torch._dynamo.reset()  # the suite's earlier compiles count toward dynamo's recompile limit of this code
    config = recipe_config(model, batch_size=8, seeds=N, compile=True, micro_batch=micro_batch)
    optimizer = make_optimizer(config)
    data = random_mnist(64, 1, seed=0)
    images, labels = data.train_images, data.train_labels
    batch_idx = torch.randint(0, 64, (N, 8), generator=torch.Generator().manual_seed(0))  # (N, B)
    params = per_model([networks.init_params(model, seed) for seed in range(N)], stacked=True)
    opt_state = per_model([optimizer.init(one_model(params, i)) for i in range(N)], stacked=True)
    lr = torch.full((N,), 0.01)
    step = device_step(config, optimizer, CPU)
    single = device_step(dataclasses.replace(config, seeds=1), optimizer, CPU, adaptive_threads=False)
    for turn in range(2):  # the first call compiles on one thread, the second runs threads side by side
        new_params, new_state, losses = step(params, opt_state, images, labels, batch_idx.roll(turn, 1), lr)
        for i in range(N):
            args = (one_model(params, i), one_model(opt_state, i), images, labels, batch_idx[i].roll(turn), lr[i])
            own_params, own_state, own_loss = single(*args)
            torch.testing.assert_close(one_model(new_params, i), own_params, **TOLERANCE)
            torch.testing.assert_close(one_model(new_state, i), own_state, **TOLERANCE)
            torch.testing.assert_close(losses[i], own_loss, **TOLERANCE)
        params, opt_state = new_params, new_state


@pytest.fixture
def caller_threads():
    """Sets the calling thread's torch thread count for a test, and puts the old one back."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_each_model_runs_on_one_thread_and_comes_back_in_its_place(caller_threads):
    """Models finish out of order here (the later ones sleep less), yet the result is in model
    order; the workers run on one OpenMP thread each, and the caller keeps its own count."""
    caller_threads(2)
    seen = []

    def gradient(params, images, labels, batch_idx):
        time.sleep(0.01 * (5 - int(batch_idx[0])))  # model 1 sleeps longest of those run side by side
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return {"w": params["w"] * 2}, params["w"].sum()

    gradients = side_by_side(gradient, workers=2)
    params = {"w": torch.arange(15.0).view(5, 3)}  # (N, 3)
    batch_idx = torch.arange(5).unsqueeze(1)  # (N, 1): model i's batch is [i]
    grads, losses = gradients(params, None, None, batch_idx)
    torch.testing.assert_close(grads["w"], params["w"] * 2, rtol=0, atol=0)
    torch.testing.assert_close(losses, params["w"].sum(dim=1), rtol=0, atol=0)
    assert len(seen) == 5 and all(name.startswith("tinymnist-model") and threads == 1 for name, threads in seen)
    assert len({name for name, _ in seen}) == 2  # both workers ran models
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

    gradients = side_by_side(gradient, workers=2)
    gradients({"w": torch.zeros(7, 2)}, None, None, torch.arange(7).unsqueeze(1))
    assert most[0] == expected


def test_an_error_in_one_model_reaches_the_caller_and_the_rest_are_not_run(caller_threads):
    """Model 1 fails: the caller gets its error, and the models queued behind it do not run."""
    caller_threads(1)
    started = []

    def gradient(params, images, labels, batch_idx):
        i = int(batch_idx[0])
        started.append(i)
        if i == 1:
            raise RuntimeError("model 1 failed")
        return {"w": params["w"]}, params["w"].sum()

    gradients = side_by_side(gradient, workers=2)
    with pytest.raises(RuntimeError, match="model 1 failed"):
        gradients({"w": torch.zeros(6, 2)}, None, None, torch.arange(6).unsqueeze(1))
    time.sleep(0.1)  # a model still queued would have started by now
    assert started == [0, 1]
