"""transforms/direct_call.py: the step traced once, compiled by inductor, called without dynamo.

Two oracles, from the same parameters and batches: torch.compile of the same function, which builds
the same kernels, so its numbers are required bit for bit; and the plain function (eager), to float32
reassociation, since inductor fuses and splits sums its own way."""

import dataclasses
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from tests.support import fit_run, needs_cpp_compiler, random_mnist
from tinymnist.algorithm import cpu_pool
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.tool import checkpoint
from tinymnist.transforms import direct_call, speed
from tinymnist.transforms.direct_call import Layout, called_directly
from tinymnist.transforms.several_steps import SeveralSteps

CPU = torch.device("cpu")
# Against eager: Adam divides each gradient by its own running size, so for a weight whose gradient
# is near 0 a rounding difference between eager's and inductor's kernels becomes a visible share of
# the learning rate (1e-3): 2e-6 in one of fc1's 100,352 weights after 3 steps on an Intel Xeon.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def recipe_step(model: str, steps: int = 3):
    config = recipe_config(model)
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, CPU)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (256,), generator=g)
    batch = min(config.batch_size, 256)  # lenet's 8192 would take 20 s here, and shows nothing more
    batch_idx = torch.randint(0, 256, (steps, batch), generator=g)  # (steps, B)
    lr = torch.linspace(config.lr, config.lr / 2, steps)  # (steps,)
    return make_step(make_gradient(config), optimizer), state, images, labels, batch_idx, lr


def run_steps(step, state, images, labels, batch_idx, lr):
    params, opt_state, losses = state.params, state.opt_state, []
    for idx, rate in zip(batch_idx, lr, strict=True):
        params, opt_state, loss = step(params, opt_state, images, labels, idx, rate)
        losses.append(loss)
    return params, opt_state, torch.stack(losses)


def test_a_layout_flattens_and_rebuilds_nested_dicts_and_tuples():
    tree = (
        {"w": torch.zeros(2), "b": torch.ones(1)},
        {"step": torch.tensor(3), "m": {"w": torch.full((2,), 5.0)}},
        [torch.eye(2)],
    )
    layout = Layout(tree)
    leaves = layout.flatten(tree)
    assert [x.tolist() for x in leaves] == [[0.0, 0.0], [1.0], 3, [5.0, 5.0], [[1.0, 0.0], [0.0, 1.0]]]
    rebuilt = layout.rebuild(leaves)
    assert type(rebuilt) is tuple and type(rebuilt[2]) is list and list(rebuilt[1]) == ["step", "m"]
    torch.testing.assert_close(rebuilt, tree, rtol=0, atol=0)
    reordered = ({"b": torch.ones(1), "w": torch.zeros(2)}, tree[1], tree[2])  # keys, not insertion order
    assert layout.flatten(reordered)[0] is reordered[0]["w"]


def test_a_layout_refuses_a_tree_of_another_shape():
    layout = Layout(({"w": torch.zeros(2)},))
    with pytest.raises(ValueError, match="a dict of 2 entries where the compiled graph takes 1"):
        layout.flatten(({"w": torch.zeros(2), "b": torch.zeros(1)},))
    with pytest.raises(KeyError):
        layout.flatten(({"v": torch.zeros(2)},))


@needs_cpp_compiler
@pytest.mark.parametrize("model", sorted(speed.CPU_DIRECT_CALL))
def test_the_step_called_directly_is_torch_compiles_and_near_eagers(model):
    """The step against torch.compile's, from the same seed, bit for bit; its gradient against eager's, with
    inductor drawing eager's random numbers (fallback_random: dropout's masks then match eager's). Not the
    step against eager's: RMSprop and Adam divide a gradient by its own size, and for a weight whose gradient
    is near 0 a rounding difference moves it by a visible share of fast's learning rate (1e-2)."""
    from torch._inductor import config as inductor_config

    step, state, images, labels, batch_idx, lr = recipe_step(model)
    torch.manual_seed(0)
    got = run_steps(called_directly(step, speed.compile_options()), state, images, labels, batch_idx, lr)
    torch.manual_seed(0)
    expected = run_steps(speed.compiled(step), state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    gradient = make_gradient(recipe_config(model))
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(0)
        got = called_directly(gradient, speed.compile_options())(state.params, images, labels, batch_idx[0])
    torch.manual_seed(0)
    torch.testing.assert_close(got, gradient(state.params, images, labels, batch_idx[0]), **TOLERANCE)


@needs_cpp_compiler
def test_it_compiles_again_only_for_a_new_shape_or_thread_count(monkeypatch):
    compiles = []

    def counted(*args):
        compiles.append(torch.get_num_threads())
        return compiled_graph(*args)

    compiled_graph = direct_call.compiled_graph
    monkeypatch.setattr(direct_call, "compiled_graph", counted)
    fn = called_directly(lambda d, x: {"y": d["w"] @ x + 1}, speed.compile_options())
    w, x = torch.randn(3, 4), torch.randn(4, 2)
    for _ in range(3):
        torch.testing.assert_close(fn({"w": w}, x)["y"], w @ x + 1, **TOLERANCE)
    assert len(compiles) == 1
    torch.testing.assert_close(fn({"w": w}, x[:, :1])["y"], w @ x[:, :1] + 1, **TOLERANCE)  # (4, 1): a new shape
    assert len(compiles) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # inductor's CPU kernels are built for a thread count
        fn({"w": w}, x)
        fn({"w": w}, x)
    finally:
        torch.set_num_threads(threads)
    assert compiles == [threads, threads, threads + 1]
    fn({"w": w}, x)
    assert len(compiles) == 3  # back on the first count: its graph is kept


@needs_cpp_compiler
def test_threads_that_meet_a_new_key_at_once_compile_it_once(monkeypatch):
    """Tracing sets process-wide state (torch's "compiling" flag, torch.fx's tracer), so a new key is traced
    and compiled by one thread while another that meets it waits, then takes the same graph."""
    compiles, compiling = [], threading.Event()

    def counted(*args):
        compiles.append(threading.current_thread())
        compiling.set()
        time.sleep(0.3)  # the other thread meets the key meanwhile
        return compiled_graph(*args)

    compiled_graph = direct_call.compiled_graph
    monkeypatch.setattr(direct_call, "compiled_graph", counted)
    fn = called_directly(lambda d, x: {"y": d["w"] @ x + 1}, speed.compile_options())
    w, x = torch.randn(3, 4), torch.randn(4, 2)
    results = []
    other = threading.Thread(target=lambda: results.append(fn({"w": w}, x)["y"]))
    other.start()
    compiling.wait()
    results.append(fn({"w": w}, x)["y"])
    other.join()
    assert compiles == [other] and len(results) == 2
    for y in results:
        torch.testing.assert_close(y, w @ x + 1, **TOLERANCE)


@needs_cpp_compiler
def test_random_numbers_are_drawn_at_each_call_from_torchs_generator():
    """Traced on fake tensors, so compiling draws nothing; each call draws new masks, a seed repeats them."""
    fn = called_directly(lambda x: (F.dropout(x, 0.5, training=True),), speed.compile_options())
    x = torch.ones(4096)
    torch.manual_seed(0)
    first, second = fn(x)[0], fn(x)[0]
    assert not torch.equal(first, second)
    assert set(first.unique().tolist()) == {0.0, 2.0} and 0.4 < (first == 0).float().mean() < 0.6
    torch.manual_seed(0)
    torch.testing.assert_close(fn(x)[0], first, rtol=0, atol=0)


def test_it_takes_tensors_that_need_no_gradient_only():
    with pytest.raises(TypeError, match="tensors"):
        called_directly(lambda x, scale: (x * scale,), {})(torch.ones(2), 2.0)
    with pytest.raises(TypeError, match="need no gradient"):
        called_directly(lambda x: (x * 2,), {})(torch.ones(2, requires_grad=True))


@needs_cpp_compiler
def test_an_argument_of_other_strides_compiles_again():
    """inductor's kernels index by the strides they were compiled for."""
    fn = called_directly(lambda x: (x * 2 + 1,), speed.compile_options())
    x = torch.randn(4, 4)
    torch.testing.assert_close(fn(x)[0], x * 2 + 1, rtol=0, atol=0)
    torch.testing.assert_close(fn(x.t())[0], x.t() * 2 + 1, rtol=0, atol=0)  # the same shape, transposed


@pytest.fixture
def direct_calls(monkeypatch):
    """The functions device_step hands called_directly, which still compiles them."""
    wrapped = []

    def spy(fn, options):
        wrapped.append(fn)
        return called_directly(fn, options)

    monkeypatch.setattr(speed, "called_directly", spy)
    return wrapped


@needs_cpp_compiler
@pytest.mark.parametrize("model", ["mlp", "mlp3", "cnn"])
def test_several_steps_per_call_are_direct_calls_bit_for_bit_with_the_single_step(model, direct_calls):
    """train --steps-per-call runs the k-step graph for k steps and the single step for fewer, both
    called directly (lenet's 8-batch epoch is too short for it). cnn's k steps a call draw the dropout
    masks of k single calls from the same seed: inductor draws each graph's seeds from torch's generator
    in turn."""
    _, state, images, labels, batch_idx, lr = recipe_step(model, steps=4)
    config = recipe_config(model, compile=True, steps_per_call=4, log_interval=4)
    several = speed.device_step(config, make_optimizer(config), CPU, adaptive_threads=False)
    assert isinstance(several, SeveralSteps) and len(direct_calls) == 2
    torch.manual_seed(0)
    params, opt_state, total = several(state.params, state.opt_state, images, labels, batch_idx, lr)
    torch.manual_seed(0)
    expected = run_steps(several.one, state, images, labels, batch_idx, lr)
    torch.testing.assert_close((params, opt_state), expected[:2], rtol=0, atol=0)
    torch.testing.assert_close(total, expected[2].sum(), **TOLERANCE)


@needs_cpp_compiler
@pytest.mark.parametrize(
    ("model", "data_parallel", "direct", "micro_batch"),
    [
        ("mlp3", False, ["step"], None),
        ("mlp", False, ["step"], None),
        ("cnn", False, ["step"], None),
        ("fast", False, ["step"], None),
        ("lenet", False, ["step"], None),
        ("lenet", False, ["gradient", "update"], 256),  # micro-batched: the pieces compile, the loop runs in Python
        ("mlp3", True, [], None),
        ("fast", True, [], None),
    ],
)
def test_train_calls_the_compiled_graphs_directly_unless_data_parallel(
    model, data_parallel, direct, micro_batch, monkeypatch
):
    wrapped = []
    monkeypatch.setattr(speed, "called_directly", lambda fn, options: wrapped.append(fn) or fn)
    monkeypatch.setattr(speed.torch, "compile", lambda fn, **kwargs: fn)  # nothing compiles here
    config = recipe_config(model, compile=True, micro_batch=micro_batch)
    speed.device_step(config, make_optimizer(config), CPU, data_parallel=(lambda g: g) if data_parallel else None)
    assert [fn.__name__ for fn in wrapped] == direct


@needs_cpp_compiler
@pytest.mark.parametrize(("model", "batch"), [("fast", 512), ("lenet", 512)])
def test_micro_batches_called_directly_are_torch_compiles_bit_for_bit(model, batch, direct_calls, monkeypatch):
    """A CPU step in micro-batches as train builds it: a compiled gradient per micro-batch (2 of 256 images
    here; fast's through polyphase.py) and a compiled update, called directly, give the numbers of the same
    pieces called through torch.compile, to the bit."""
    config = recipe_config(model, compile=True, batch_size=batch, micro_batch=256)
    optimizer = make_optimizer(config)
    _, state, images, labels, batch_idx, lr = recipe_step(model, steps=2)
    batch_idx = torch.randint(0, len(images), (2, batch), generator=torch.Generator().manual_seed(1))  # (steps, B)
    direct = speed.device_step(config, optimizer, CPU, adaptive_threads=False)
    assert [fn.__name__ for fn in direct_calls] == ["gradient", "update"]
    monkeypatch.setattr(speed, "CPU_DIRECT_CALL", set())
    through_dynamo = speed.device_step(config, optimizer, CPU, adaptive_threads=False)
    assert len(direct_calls) == 2
    got = run_steps(direct, state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got, run_steps(through_dynamo, state, images, labels, batch_idx, lr), rtol=0, atol=0)


@needs_cpp_compiler
def test_code_that_asks_whether_it_is_compiled_is_told_yes(monkeypatch):
    """cpu_pool.max_pool2d takes its compiled form only under a compiler: so under this one too."""
    compiled_pools = []

    def counted(x, kernel):
        compiled_pools.append(kernel)
        return first_max_pool2d(x, kernel)

    first_max_pool2d = cpu_pool.first_max_pool2d
    monkeypatch.setattr(cpu_pool, "first_max_pool2d", counted)
    x = torch.randn(2, 3, 8, 8)
    got = called_directly(lambda x: (cpu_pool.max_pool2d(x, 2),), speed.compile_options())(x)[0]
    assert compiled_pools == [2]
    torch.testing.assert_close(got, F.max_pool2d(x, 2), rtol=0, atol=0)
    assert not torch.compiler.is_compiling()


@needs_cpp_compiler
def test_n_models_vmapped_step_called_directly_is_the_eager_one(direct_calls):
    """A --seeds run of mlp3 on the CPU: the vmapped step, traced and called directly."""
    config = recipe_config("mlp3", seeds=3, compile=True)
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, CPU)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (256,), generator=g)
    batch_idx = torch.randint(0, 256, (2, 3, config.batch_size), generator=g)  # (steps, N, B)
    lr = torch.tensor([[1e-3, 2e-3, 5e-4]] * 2)  # (steps, N)
    direct = speed.device_step(config, optimizer, CPU, adaptive_threads=False)
    assert len(direct_calls) == 1
    eager = speed.device_step(dataclasses.replace(config, compile=False), optimizer, CPU, adaptive_threads=False)
    got = run_steps(direct, state, images, labels, batch_idx, lr)
    torch.testing.assert_close(got, run_steps(eager, state, images, labels, batch_idx, lr), **TOLERANCE)


@needs_cpp_compiler
def test_a_compiled_mlp3_run_resumed_from_a_checkpoint_is_bit_exact(tmp_path, direct_calls):
    """fit() end to end on the direct step: 2 epochs straight equal 1 epoch, a checkpoint, 1 more."""
    data = random_mnist(90, 30)
    config = recipe_config("mlp3", epochs=2, compile=True, threads=torch.get_num_threads())
    optimizer = make_optimizer(config)

    def fit(config, state, on_epoch_end=None):
        step = speed.device_step(config, optimizer, CPU)
        return fit_run(config, data, state, step, on_epoch_end=on_epoch_end).state

    straight = fit(config, initial_state(config, optimizer, CPU))
    path = tmp_path / "mlp3.pt"
    one_epoch = dataclasses.replace(config, epochs=1)
    fit(
        one_epoch,
        initial_state(one_epoch, optimizer, CPU),
        lambda state: checkpoint.save(path, config.to_dict(), state),
    )
    _, saved = checkpoint.load(path, CPU)
    resumed = fit(config, saved)
    assert len(direct_calls) == 3  # each run's step was called directly
    torch.testing.assert_close(
        (resumed.params, resumed.opt_state), (straight.params, straight.opt_state), rtol=0, atol=0
    )


@needs_cpp_compiler
def test_the_graph_called_directly_leaves_the_size_checks_to_its_own_key():
    """Its key guards every argument's shape and strides, so inductor's per-call checks of them are left
    out of the generated code; torch.compile's graph of the same function keeps them (the control)."""
    from torch._inductor.utils import run_and_get_code

    def fn(d):
        return {"y": d["x"].t() @ d["x"]}  # an extern matmul: inductor checks its output's size too

    x = {"x": torch.randn(8, 3)}
    _, direct = run_and_get_code(called_directly(fn, speed.compile_options()), x)
    _, dynamo = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), x)
    assert direct and "assert_size_stride(" not in "".join(direct)
    assert dynamo and "assert_size_stride(" in "".join(dynamo)
