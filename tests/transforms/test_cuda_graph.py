"""cuda_graph.py: the in-place step (any device) and the CUDA-graph replay (CUDA only)."""

import pytest
import torch

from tests.support import Silent, fit_run, needs_cpp_compiler, needs_cuda, random_mnist
from tinymnist.algorithm import networks, optim
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.algorithm.trees import tree_map
from tinymnist.transforms import cuda_graph
from tinymnist.transforms.speed import compiled, device_step


def optimizer_of(config):
    return optim.OPTIMIZERS[config.optimizer]()


def clone(tree):
    return tree_map(torch.clone, tree)


def run_steps(step, params, opt_state, data, batches, lr):
    """Call `step` once per batch row; return clones of the final params and state."""
    for batch_idx in batches:
        params, opt_state, loss = step(params, opt_state, data.train_images, data.train_labels, batch_idx, lr)
    return clone(params), clone(opt_state), loss.clone()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_cpp_compiler)], ids=["eager", "compiled"])
def test_in_place_step_writes_what_the_pure_step_returns(compile):
    """lenet has no dropout, so both steps see identical arithmetic from identical inputs."""
    data = random_mnist(96, 1)
    config = recipe_config("lenet", batch_size=32)
    optimizer = optimizer_of(config)
    params = networks.init_params("lenet", 0)
    opt_state = optimizer.init(params)
    batch_idx, lr = torch.arange(32), torch.tensor(0.01)
    pure = make_step(make_gradient(config), optimizer)
    expected_params, expected_state, expected_loss = (compiled(pure) if compile else pure)(
        params, opt_state, data.train_images, data.train_labels, batch_idx, lr
    )

    update = cuda_graph.in_place(pure)
    if compile:
        update = compiled(update)
    buffers = clone(params), clone(opt_state)
    addresses = [p.data_ptr() for p in buffers[0].values()]
    loss = update(*buffers, data.train_images, data.train_labels, batch_idx, lr)
    assert [p.data_ptr() for p in buffers[0].values()] == addresses  # written in place
    torch.testing.assert_close(buffers[0], expected_params)
    torch.testing.assert_close(buffers[1], expected_state)
    torch.testing.assert_close(loss, expected_loss)
    assert not torch.equal(buffers[0]["conv1.weight"], params["conv1.weight"])  # the step did change them


@needs_cuda
@pytest.mark.parametrize(("model", "compile"), [("cnn", False), ("mlp", True), ("lenet", True)])
def test_graphed_step_trains_like_the_plain_step(model, compile):
    """Five replays of the recorded step land where five ordinary steps land.

    cnn runs eager both ways: its dropout masks come from the same CUDA generator
    offsets with or without a graph (compiled code draws its masks differently)."""
    device = torch.device("cuda")
    data = random_mnist(320, 1, device=device)
    config = recipe_config(model, batch_size=64, compile=compile)
    optimizer = optimizer_of(config)
    batches = torch.randperm(320, device=device).view(5, 64)  # (5, 64)
    lr = torch.tensor(config.lr, device=device)
    finals = {}
    for graphed in (False, True):
        state = initial_state(config, optimizer, device)  # also reseeds the CUDA generator
        step = device_step(config.__class__(**{**config.to_dict(), "cuda_graphs": graphed}), optimizer, device)
        finals[graphed] = run_steps(step, state.params, state.opt_state, data, batches, lr)
    torch.testing.assert_close(finals[True][0], finals[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(finals[True][1], finals[False][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(finals[True][2], finals[False][2], rtol=1e-4, atol=1e-5)


@needs_cuda
def test_graphed_step_leaves_the_callers_tensors_alone_and_refuses_other_data():
    device = torch.device("cuda")
    data = random_mnist(128, 1, device=device)
    config = recipe_config("mlp", compile=False)
    optimizer = optimizer_of(config)
    state = initial_state(config, optimizer, device)
    before = clone(state.params)
    step = device_step(config, optimizer, device)
    assert isinstance(step, cuda_graph.GraphedStep)
    batch_idx, lr = torch.arange(64, device=device), torch.tensor(config.lr, device=device)
    params, _, _ = step(state.params, state.opt_state, data.train_images, data.train_labels, batch_idx, lr)
    torch.testing.assert_close(state.params, before, rtol=0, atol=0)  # the recording worked on copies
    assert not torch.equal(params["fc1.weight"], before["fc1.weight"])
    with pytest.raises(ValueError, match="recorded with"):
        step(params, state.opt_state, data.train_images.clone(), data.train_labels, batch_idx, lr)


@needs_cuda
def test_fit_on_cuda_keeps_each_epochs_state_apart():
    """Each epoch's TrainState is a snapshot, not the graph's buffers that the next epoch overwrites."""
    device = torch.device("cuda")
    data = random_mnist(256, 64, device=device)
    states = []
    config = recipe_config("cnn", epochs=2)
    optimizer = optimizer_of(config)
    step = device_step(config, optimizer, device)
    assert isinstance(step, cuda_graph.GraphedStep)
    fit_run(
        config,
        data,
        initial_state(config, optimizer, device),
        step,
        Silent(),
        on_epoch_end=lambda state: states.append((state, clone(state.params))),
    )
    (first, first_copy), (second, _) = states
    torch.testing.assert_close(first.params, first_copy, rtol=0, atol=0)  # epoch 2 did not write into epoch 1's state
    assert not torch.equal(first.params["fc1.weight"], second.params["fc1.weight"])
