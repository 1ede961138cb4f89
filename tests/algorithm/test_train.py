"""The training loop's pieces: batching, evaluation, the compiled step, fit()."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.support import Silent, fit_run, needs_cpp_compiler, random_mnist
from tinymnist.algorithm import networks, optim, train
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import (
    epoch_batches,
    evaluate,
    initial_state,
    make_gradient,
    make_step,
    scale_images,
)
from tinymnist.transforms.speed import compiled, micro_batched

CPU = torch.device("cpu")


def optimizer_of(config):
    return optim.OPTIMIZERS[config.optimizer]()


def plain_step(config, optimizer):
    return make_step(make_gradient(config), optimizer)


def test_epoch_batches_cover_every_image_once_with_a_fixed_shape():
    batches = epoch_batches(1000, 64, torch.Generator().manual_seed(0), CPU)
    assert batches.shape == (16, 64)  # ceil(1000 / 64) steps, all full
    first_pass = batches.flatten()[:1000]
    assert torch.equal(first_pass.sort().values, torch.arange(1000))  # each image exactly once
    top_up = batches.flatten()[1000:]
    assert len(top_up.unique()) == 24  # 24 distinct extra images fill the last step
    assert int(top_up.max()) < 1000


def test_epoch_batches_are_seeded_and_differ_between_epochs():
    shuffle = torch.Generator().manual_seed(5)
    a1, a2 = epoch_batches(300, 30, shuffle, CPU), epoch_batches(300, 30, shuffle, CPU)
    b1 = epoch_batches(300, 30, torch.Generator().manual_seed(5), CPU)
    assert torch.equal(a1, b1)
    assert not torch.equal(a1, a2)


def test_epoch_batches_leave_the_global_generator_alone():
    """Shuffling has its own generator, so dropout's stream does not depend on the data order."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    epoch_batches(300, 32, torch.Generator().manual_seed(0), CPU)
    assert torch.equal(torch.get_rng_state(), before)


def test_scale_images_follows_the_recipe():
    pixels = torch.tensor([[0, 255], [51, 102]], dtype=torch.uint8).expand(3, 2, 2)  # (3, 2, 2)
    x = scale_images(pixels, mean=0.5, std=0.5)
    assert x.shape == (3, 1, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))


def test_evaluate_is_exact_for_any_chunk_size():
    data = random_mnist(10, 250)
    config = recipe_config("cnn", test_batch_size=64)  # 250 = 3 chunks of 64 + 58
    params = networks.init_params("cnn", 3)
    result = evaluate(config, params, data.test_images, data.test_labels)
    x = scale_images(data.test_images, config.recipe.mean, config.recipe.std)
    out = networks.apply("cnn", params, x)  # (250, 10): the whole set in one go, as the oracle
    assert result.total == 250
    assert result.correct == int((out.argmax(1) == data.test_labels).sum())
    assert abs(result.loss - F.nll_loss(out, data.test_labels).item()) < 1e-5
    whole = evaluate(recipe_config("cnn", test_batch_size=1000), params, data.test_images, data.test_labels)
    assert whole.correct == result.correct


def test_eager_step_matches_a_torch_optim_step():
    """One step of ours equals nn.Module + loss.backward() + torch.optim.Adam on the same batch."""
    data = random_mnist(64, 1)
    config = recipe_config("mlp")
    optimizer = optimizer_of(config)
    params = networks.init_params("mlp", 0)
    step = plain_step(config, optimizer)
    lr = torch.tensor(config.lr)
    new_params, _, loss = step(
        params, optimizer.init(params), data.train_images, data.train_labels, torch.arange(64), lr
    )

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    net.load_state_dict({k.replace("fc1", "1").replace("fc2", "3"): v for k, v in params.items()})
    reference = torch.optim.Adam(net.parameters(), lr=config.lr, foreach=False)
    ref_loss = F.cross_entropy(net(scale_images(data.train_images, 0.5, 0.5)), data.train_labels)
    ref_loss.backward()
    reference.step()
    torch.testing.assert_close(loss, ref_loss.detach())
    torch.testing.assert_close(new_params["fc1.weight"], net[1].weight.detach())
    torch.testing.assert_close(new_params["fc2.bias"], net[3].bias.detach())


def test_fit_logs_at_the_interval_and_evaluates_every_epoch():
    data = random_mnist(100, 50)
    config = recipe_config("mlp", batch_size=16, epochs=2, log_interval=3, compile=False)  # 7 steps an epoch
    reporter, ended = Silent(), []
    optimizer = optimizer_of(config)
    result = fit_run(
        config,
        data,
        initial_state(config, optimizer, CPU),
        plain_step(config, optimizer),
        reporter,
        on_epoch_end=ended.append,
    )
    assert reporter.logged_steps == [(1, 3), (1, 6), (1, 7), (2, 3), (2, 6), (2, 7)]
    assert reporter.compiling == [True, False]  # the first step of a run is the one that compiles
    assert [r["epoch"] for r in reporter.records] == [0, 1, 2]  # the untrained network first
    assert reporter.records[0]["train_loss"] is None and reporter.records[2]["train_loss"] > 0
    assert result.records == reporter.records and result.state.epoch == 2
    assert [s.epoch for s in ended] == [1, 2] and ended[-1] is result.state


def test_fit_leaves_a_steps_untimed_seconds_off_the_training_clock(monkeypatch):
    """A step that compiles again mid-run (AdaptiveThreads at a new thread count) says how long that
    took in untimed_seconds(): the training time leaves it out, as it leaves out the first step."""
    data = random_mnist(100, 50)
    config = recipe_config("mlp", batch_size=16, epochs=2, compile=False)  # 7 steps an epoch
    optimizer = optimizer_of(config)
    plain, clock = plain_step(config, optimizer), {"now": 0.0, "calls": 0, "untimed": 0.0}
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))  # train.py's clock only

    def step(*args):
        clock["calls"] += 1
        extra = 5.0 if clock["calls"] == 4 else 0.0  # the fourth call compiles for 5 s
        clock["now"] += 1.0 + extra
        clock["untimed"] += extra
        return plain(*args)

    step.untimed_seconds = lambda: clock["untimed"]
    result = fit_run(config, data, initial_state(config, optimizer, CPU), step, Silent())
    assert clock["calls"] == 14
    assert result.train_seconds == 13.0  # the 13 steps after the first, 1 s each
    assert result.untimed_seconds == 5.0


@needs_cpp_compiler
def test_compiled_step_never_recompiles_and_agrees_with_eager():
    """mlp3's batch of 15 makes every other batch row a misaligned view, and the lr changes
    every epoch: neither may recompile. Compiled and eager runs end with the same params."""
    data = random_mnist(150, 30)  # 10 steps of 15 an epoch
    finals = {}
    for compile in (False, True):
        config = recipe_config("mlp3", epochs=3, gamma=0.5)
        optimizer = optimizer_of(config)
        step = compiled(plain_step(config, optimizer)) if compile else plain_step(config, optimizer)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            result = fit_run(config, data, initial_state(config, optimizer, CPU), step, Silent())
        finals[compile] = result.state.params
    for name in finals[False]:
        torch.testing.assert_close(finals[True][name], finals[False][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("model", "batch_size", "micro_batch"), [("mlp3", 15, 4), ("lenet", 64, 16)])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_cpp_compiler)], ids=["eager", "compiled"])
def test_micro_batches_give_the_whole_batch_gradient(model, batch_size, micro_batch, compile):
    """Chunks of 4 (4+4+4+3 for 15 images) or 16, weighted by their share: the same step as one pass.
    Plain SGD, whose update is linear in the gradient: Adam's first step is about
    lr * sign(grad) and would amplify float rounding in near-zero gradients."""
    data = random_mnist(batch_size, 1)
    config = recipe_config(model, "sgd", batch_size=batch_size, lr=0.1)
    optimizer = optimizer_of(config)
    params = networks.init_params(model, 0)
    args = (data.train_images, data.train_labels, torch.randperm(batch_size), torch.tensor(config.lr))
    whole = plain_step(config, optimizer)(params, optimizer.init(params), *args)
    gradient = compiled(make_gradient(config)) if compile else make_gradient(config)
    chunked = make_step(micro_batched(gradient, micro_batch), optimizer)(params, optimizer.init(params), *args)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[2], whole[2])
    assert not torch.equal(chunked[0][next(iter(params))], params[next(iter(params))])


def test_the_public_api_snippet_trains(tiny_split):
    """The dozen lines in tinymnist's docstring (and the README) run as written."""
    import subprocess
    import sys

    import tinymnist

    snippet = [line[4:] for line in tinymnist.__doc__.splitlines() if line.startswith("    ")]
    code = "\n".join(snippet).replace('"data"', repr(str(tiny_split))).replace("tm.compiled(", "(")  # eager: fast
    # In a process of its own: flush_denormals sets a CPU flag that would outlast the test.
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 0.0 <= float(printed) <= 1.0
    assert "import tinymnist as tm" in code and "tm.fit(" in code


def test_importing_the_package_imports_no_torch():
    """The API is imported on first use: `tinymnist --help` and Ctrl-C at start-up stay quick."""
    import subprocess
    import sys

    code = "import sys, tinymnist; assert 'torch' not in sys.modules; tinymnist.fit; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
