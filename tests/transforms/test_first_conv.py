"""transforms/first_conv.py: a one-channel convolution's weight gradient as a forward convolution.

The oracle is autograd's own convolution_backward. The rewrite adds the same products in
another order, so float64 agrees to 1e-12 and float32 to float32's rounding of ~10^4-term sums.
"""

import re
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

from tests.support import assert_user_error, needs_cpp_compiler, random_mnist, run, train_args
from tinymnist.algorithm import networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.errors import TinyMnistError
from tinymnist.transforms import first_conv, speed
from tinymnist.transforms.direct_call import called_directly
from tinymnist.transforms.first_conv import (
    as_forward_is_faster,
    inductor_pass,
    node_key,
    rewrite,
    weight_grad_as_forward,
)
from tinymnist.transforms.speed import compiled
from tinymnist.transforms.vmap import vmapped

aten = torch.ops.aten
ALWAYS = first_conv.CHOICES["always"]


def autograd_weight_grads(x, grad_out, weight, padding: int, groups: int):
    """convolution_backward's weight and bias gradients, as autograd computes them."""
    _, weight_grad, bias_grad = aten.convolution_backward(
        grad_out,
        x,
        weight,
        [weight.shape[0]],
        [1, 1],
        [padding] * 2,
        [1, 1],
        False,
        [0, 0],
        groups,
        [False, True, True],
    )
    return weight_grad, bias_grad


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    groups=st.integers(1, 3),
    out_per_group=st.integers(1, 4),
    kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    size=st.tuples(st.integers(5, 12), st.integers(5, 12)),
)
def test_weight_grad_as_forward_is_autograds(batch, groups, out_per_group, kernel, padding, size):
    """Any batch, kernel, padding and image size, and any number of one-channel groups (N models under vmap)."""
    g = torch.Generator().manual_seed(batch * 1000 + sum(size))
    x = torch.randn(batch, groups, *size, generator=g, dtype=torch.float64)  # (B, G, H, W)
    weight = torch.randn(groups * out_per_group, 1, *kernel, generator=g, dtype=torch.float64)  # (G*O, 1, kh, kw)
    out_size = [s + 2 * p - k + 1 for s, p, k in zip(size, padding, kernel, strict=True)]
    grad_out = torch.randn(batch, groups * out_per_group, *out_size, generator=g, dtype=torch.float64)
    _, *expected = aten.convolution_backward(
        grad_out, x, weight, [len(weight)], [1, 1], list(padding), [1, 1], False, [0, 0], groups, [False, True, True]
    )
    got = weight_grad_as_forward(x, grad_out, list(padding), groups)
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


def two_conv_gradient(stride=1, dilation=1, wrt_image=False, device="cpu"):
    """Autograd's graph (make_fx) of a gradient through a one-channel conv and a four-channel one:
    the weights' gradients, and with `wrt_image` the image's too."""

    def loss(w1, w2, x):
        hidden = F.conv2d(x, w1, stride=stride, dilation=dilation).relu()  # (B, 4, H', W')
        return F.conv2d(hidden, w2).square().sum()

    g = torch.Generator().manual_seed(0)
    shapes = [(4, 1, 3, 3), (2, 4, 3, 3), (5, 1, 12, 12)]  # w1, w2, x
    args = [torch.randn(shape, generator=g, dtype=torch.float64).to(device) for shape in shapes]
    gradient = torch.func.grad(loss, argnums=(0, 1, 2) if wrt_image else (0, 1))
    return make_fx(gradient, tracing_mode="fake")(*args), args


def conv_backwards(graph: torch.fx.Graph) -> int:
    return sum(node.target is aten.convolution_backward.default for node in graph.nodes)


def test_the_pass_rewrites_the_one_channel_convolution_only():
    traced, args = two_conv_gradient()
    expected = traced(*args)
    assert conv_backwards(traced.graph) == 2
    rewrite(traced.graph, ALWAYS)
    traced.recompile()
    assert conv_backwards(traced.graph) == 1  # the four-channel layer keeps oneDNN's backward
    for e, o in zip(expected, traced(*args), strict=True):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "case",
    [{"stride": 2}, {"dilation": 2}, {"wrt_image": True}, {"device": "meta"}],
    ids=["strided", "dilated", "the image's gradient asked", "not the CPU"],
)
def test_the_pass_leaves_other_convolutions_alone(case):
    traced, _ = two_conv_gradient(**case)
    rewrite(traced.graph, ALWAYS)
    assert conv_backwards(traced.graph) == 2


@pytest.mark.parametrize("as_forward_faster", [True, False])
def test_the_pass_rewrites_where_its_choice_says(as_forward_faster):
    traced, _ = two_conv_gradient()
    asked = []
    rewrite(traced.graph, lambda node: asked.append(node) or as_forward_faster)
    assert len(asked) == 1  # only the one-channel convolution is offered
    assert conv_backwards(traced.graph) == (1 if as_forward_faster else 2)


def first_layer_backward(traced: torch.fx.GraphModule) -> torch.fx.Node:
    return next(
        n for n in traced.graph.nodes if n.target is aten.convolution_backward.default and first_conv.rewritable(n)
    )


@pytest.fixture
def timings(monkeypatch):
    """first_conv's timer replaced: (oneDNN's backward, as forward) seconds per call, as the test sets them;
    `calls` counts the measurements. This process's remembered choices are forgotten."""
    monkeypatch.setattr(first_conv, "CHOSEN", {})
    timings = {"seconds": (1e-3, 1e-3), "calls": 0}

    def timed_in_turns(kernels):
        timings["calls"] += 1
        return list(timings["seconds"])

    monkeypatch.setattr(first_conv, "timed_in_turns", timed_in_turns)
    return timings


@pytest.mark.parametrize(
    "seconds, expected",
    [((2e-3, 1e-3), True), ((1e-3, 0.85e-3), True), ((1e-3, 0.95e-3), False), ((1e-3, 2e-3), False)],
    ids=["twice as fast", "past the margin", "within the margin: oneDNN's stays", "slower"],
)
def test_the_measured_choice_takes_the_faster_kernel_by_a_margin(timings, seconds, expected):
    """(oneDNN's backward, as forward) seconds per call -> whether the rewrite is taken."""
    timings["seconds"] = seconds
    assert as_forward_is_faster(node_key(first_layer_backward(two_conv_gradient()[0]))) is expected


def test_the_choice_is_measured_once_per_process_for_the_same_arguments_and_threads(timings, monkeypatch):
    """A step and its k-step graph, or two micro-batch graphs of one shape, take the same kernel."""
    node = first_layer_backward(two_conv_gradient()[0])
    timings["seconds"] = (2e-3, 1e-3)
    assert as_forward_is_faster(node_key(node)) is True
    timings["seconds"] = (1e-3, 2e-3)  # the machine changed its mind: the first choice holds
    assert as_forward_is_faster(node_key(first_layer_backward(two_conv_gradient()[0]))) is True
    assert timings["calls"] == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)  # another thread count is measured anew
    assert as_forward_is_faster(node_key(node)) is False
    assert timings["calls"] == 2


def test_the_measurement_runs_both_kernels_on_real_tensors(monkeypatch):
    monkeypatch.setattr(first_conv, "CHOSEN", {})
    measured = []
    timed_in_turns = first_conv.timed_in_turns
    monkeypatch.setattr(
        first_conv, "timed_in_turns", lambda kernels: measured.append(timed_in_turns(kernels)) or measured[-1]
    )
    state = torch.get_rng_state()
    assert isinstance(as_forward_is_faster(node_key(first_layer_backward(two_conv_gradient()[0]))), bool)
    assert len(measured[0]) == 2 and all(seconds > 0 for seconds in measured[0])
    assert torch.equal(torch.get_rng_state(), state)  # its random tensors leave dropout's generator alone


def gradient_cases():
    """fast's (through its layers, as before polyphase.py) and cnn's gradients as `train` compiles them, and
    lenet's for 3 models under vmap (a grouped first layer)."""
    lenet = recipe_config("lenet", seeds=3)
    three = [networks.init_params("lenet", s) for s in range(3)]
    return {
        "fast": (make_gradient(recipe_config("fast")), networks.init_params("fast", 0), torch.arange(32)),
        "cnn": (make_gradient(recipe_config("cnn")), networks.init_params("cnn", 0), torch.arange(32)),
        "lenet x3": (
            vmapped(make_gradient(lenet)),
            {k: torch.stack([p[k] for p in three]) for k in three[0]},
            torch.arange(48).view(3, 16),
        ),
    }


def allocated_layout(code: str, buffer: str) -> tuple:
    """(shape, strides) of `buffer` as the generated code allocates it."""
    (found,) = re.findall(rf"\b{buffer} = empty_strided_cpu\(\(([\d, ]+)\), \(([\d, ]+)\)", code)
    return tuple(tuple(int(d) for d in part.replace(" ", "").strip(",").split(",")) for part in found)


@needs_cpp_compiler
@pytest.mark.parametrize("case", ["fast", "lenet x3"])
def test_the_measurement_times_the_layout_the_compiled_step_hands_onednn(timings, monkeypatch, case):
    """oneDNN's backward kept: the gradient and the input its first layer is timed with have the shapes and
    strides of the buffers the generated code hands convolution_backward."""
    timings["seconds"] = (1e-3, 2e-3)  # keep oneDNN's backward, so that the generated code calls it
    made = []
    random_tensor = first_conv.random_tensor
    monkeypatch.setattr(first_conv, "random_tensor", lambda *spec: made.append(spec) or random_tensor(*spec))
    monkeypatch.setattr(speed, "compile_options", lambda: {"post_grad_custom_post_pass": inductor_pass("measured")})
    data = random_mnist(64, 1, seed=0)
    gradient, params, batch_idx = gradient_cases()[case]
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile, so that the pass runs
        _, (code, *_) = run_and_get_code(compiled(gradient), params, data.train_images, data.train_labels, batch_idx)
    ((grad_name, x_name),) = re.findall(
        r"aten\.convolution_backward\.default\((\w+), (\w+), .*\[False, True, \w+\]\)",
        code,  # no input gradient
    )
    timed_grad, timed_x, _ = made[:3]  # the gradient, the input, the weight
    assert allocated_layout(code, grad_name) == timed_grad[:2]
    assert allocated_layout(code, x_name) == timed_x[:2]


def test_the_choice_is_part_of_inductors_cache_key(monkeypatch):
    """A graph compiled with the rewrite forced or refused is not reused where the choice is measured, nor a
    graph compiled with one measured choice where another was measured."""
    uuids = {choice: inductor_pass(choice).uuid() for choice in ("measured", "always", "never")}
    assert len(set(uuids.values())) == 3
    key = node_key(first_layer_backward(two_conv_gradient()[0]))
    monkeypatch.setattr(first_conv, "IN_FORCE", {key: True})
    as_forward = inductor_pass("measured").uuid()
    monkeypatch.setattr(first_conv, "IN_FORCE", {key: False})
    assert len({as_forward, inductor_pass("measured").uuid(), uuids["measured"]}) == 3
    assert inductor_pass("always").uuid() == uuids["always"]


@needs_cpp_compiler
def test_a_cached_graph_serves_only_a_process_that_measured_the_same_choice(timings, monkeypatch):
    """Three runs sharing inductor's on-disk caches, each measuring anew as a new process would: the
    second measures the other kernel faster and compiles its own graph; the third measures as the first
    and takes the first's graph from the cache. (When the pass measured during the compile, the second
    run took the first's graph, and its choice, from the cache.)"""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    monkeypatch.setattr(first_conv, "UNCHOSEN", set())
    data = random_mnist(64, 1, seed=0)
    gradient, params, batch_idx = gradient_cases()["fast"]

    def run_as_a_new_process(seconds) -> tuple[int, int]:
        """(compiles, cache hits) of fast's gradient, compiled anew with (backward, as forward) timings."""
        torch._dynamo.reset()
        first_conv.CHOSEN.clear()
        counters.clear()
        timings["seconds"] = seconds
        compiled(gradient)(params, data.train_images, data.train_labels, batch_idx)
        return counters["inductor"]["fxgraph_cache_miss"], counters["aot_autograd"]["autograd_cache_hit"]

    with fresh_cache(), torch._inductor.config.patch(fx_graph_cache=True):
        assert run_as_a_new_process((2e-3, 1e-3)) == (1, 0)  # as forward: compiled, cached
        assert run_as_a_new_process((1e-3, 2e-3)) == (1, 0)  # oneDNN's backward: another graph
        assert run_as_a_new_process((2e-3, 1e-3)) == (0, 1)  # as forward again: the first graph
    assert timings["calls"] == 3
    assert first_conv.UNCHOSEN == set()


@needs_cpp_compiler
@pytest.mark.parametrize(
    "case, how",
    [
        ("fast", "compiled"),
        ("fast", "compiled without the GIL"),
        ("fast", "called directly"),
        ("fast", "without layout optimization"),
        ("lenet x3", "compiled"),
        ("cnn", "compiled"),
    ],
)
def test_every_compile_measures_its_first_convolution_before_it_starts(timings, monkeypatch, case, how):
    """speed.compiled (also with the C++ wrapper, as N models side by side take it) and direct_call's compiles
    measure each first convolution before the compile, for the key the pass then looks up, also where the
    options change the layout inductor hands oneDNN: the pass finds its choice (here the rewrite) and no
    convolution goes without one."""
    monkeypatch.setattr(first_conv, "UNCHOSEN", set())
    timings["seconds"] = (2e-3, 1e-3)  # as forward is faster
    options = speed.compile_options()
    if how == "without layout optimization":  # contiguous, not channels-last: another key
        options = options | {"layout_optimization": False}
        monkeypatch.setattr(speed, "compile_options", lambda: options)
    compile = {
        "compiled without the GIL": lambda fn: compiled(fn, cpp_wrapper=True),  # speed.compile_options(): `options`
        "called directly": lambda fn: called_directly(fn, options),
    }.get(how, compiled)
    data = random_mnist(64, 1, seed=0)
    gradient, params, batch_idx = gradient_cases()[case]
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile, so that the pass runs
        _, (code, *_) = run_and_get_code(compile(gradient), params, data.train_images, data.train_labels, batch_idx)
    assert timings["calls"] == 1
    assert first_conv.UNCHOSEN == set()
    # the second layer's only: the first's rewritten (Python's wrapper calls aten, the C++ wrapper aoti_torch)
    assert len(re.findall(r"aten\.convolution_backward\.default\(|aoti_torch_cpu_convolution_backward\(", code)) == 1


def test_compiles_in_two_threads_each_keep_their_own_choices_in_force(monkeypatch):
    """IN_FORCE is one module global: a compile in another thread (direct_call's compiles are not under
    dynamo's lock) must not replace the choices while inductor is compiling with them."""
    seen = {}

    def compile_fx(graph_module, example_inputs, config_patches):
        name = threading.current_thread().name
        at_start = first_conv.IN_FORCE
        time.sleep(0.2)  # the other thread's compile starts meanwhile, unless it waits for this one
        seen[name] = (at_start, first_conv.IN_FORCE)

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", compile_fx)
    monkeypatch.setattr(first_conv, "first_convolutions", lambda graph_module, inputs: [inputs[0]])
    monkeypatch.setattr(first_conv, "as_forward_is_faster", lambda key: key == "a")
    options = {"post_grad_custom_post_pass": first_conv.inductor_pass()}
    threads = [
        threading.Thread(target=first_conv.compile_with_choices, args=(None, [key], options), name=key)
        for key in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert seen == {"a": ({"a": True},) * 2, "b": ({"b": False},) * 2}
    assert first_conv.IN_FORCE is None


def test_a_compile_outside_tinymnists_keeps_onednns_backward_and_says_which_it_met(monkeypatch):
    """No choice measured before the compile (a torch.compile with the pass but not compile_with_choices):
    nothing is timed inside the compile, whose cache key could not hold it."""
    monkeypatch.setattr(first_conv, "UNCHOSEN", set())
    monkeypatch.setattr(first_conv, "timed_in_turns", lambda kernels: pytest.fail("timed inside the compile"))
    traced, _ = two_conv_gradient()
    rewrite(traced.graph, first_conv.CHOICES["measured"])
    assert conv_backwards(traced.graph) == 2
    assert first_conv.UNCHOSEN == {node_key(first_layer_backward(two_conv_gradient()[0]))}


def test_the_convolutions_are_found_on_fake_tensors_leaving_the_generator_alone():
    """cnn's gradient (dropout draws random numbers) run for its first convolution's key only."""
    gradient = make_gradient(recipe_config("cnn"))
    data = random_mnist(64, 1, seed=0)
    args = (networks.init_params("cnn", 0), data.train_images, data.train_labels, torch.arange(16))
    traced = make_fx(gradient)(*args)
    state = torch.get_rng_state()
    (key,) = first_conv.first_convolutions(traced, list(args))
    assert torch.equal(torch.get_rng_state(), state)
    (node,) = [
        n for n in traced.graph.nodes if n.target is aten.convolution_backward.default and first_conv.rewritable(n)
    ]
    assert key == node_key(node)
    assert key[0][1][0] == (16, 1, 28, 28)  # the image's (B, 1, H, W)


@pytest.mark.parametrize("value, expected", [(None, "measured"), ("never", "never"), ("always", "always")])
def test_the_environment_pins_the_choice(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(first_conv.CHOICE_ENV, raising=False)
    else:
        monkeypatch.setenv(first_conv.CHOICE_ENV, value)
    assert first_conv.chosen_pass() is inductor_pass(expected)


def test_train_refuses_an_unknown_choice_before_any_work_even_uncompiled(monkeypatch, tiny_split, tmp_path):
    monkeypatch.setenv(first_conv.CHOICE_ENV, "sometimes")
    saved = tmp_path / "model.pt"
    assert_user_error(run(*train_args(tiny_split, "--save-model", saved)), "TINYMNIST_FIRST_CONV", "'sometimes'")
    assert not saved.exists()


@pytest.mark.parametrize(
    "value, shown",
    [(None, "measured when compiled"), ("never", "oneDNN's backward"), ("sometimes", "TINYMNIST_FIRST_CONV is")],
)
def test_info_says_how_the_first_convolutions_gradient_is_computed(monkeypatch, value, shown):
    if value is None:
        monkeypatch.delenv(first_conv.CHOICE_ENV, raising=False)
    else:
        monkeypatch.setenv(first_conv.CHOICE_ENV, value)
    result = run("info")
    assert result.exit_code == 0, result.output
    (row,) = [line for line in result.stdout.splitlines() if "First conv gradient" in line]
    assert shown in row


def test_an_empty_choice_in_the_environment_is_the_default(monkeypatch):
    monkeypatch.setenv(first_conv.CHOICE_ENV, "")
    assert first_conv.chosen_pass() is inductor_pass("measured")


def test_an_unknown_choice_in_the_environment_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(first_conv.CHOICE_ENV, "sometimes")
    with pytest.raises(
        TinyMnistError, match=r"TINYMNIST_FIRST_CONV is 'sometimes'; set it to one of measured, always, never"
    ):
        first_conv.chosen_pass()


def test_the_pass_rewrites_vmaps_grouped_first_layer():
    """3 models under vmap: one grouped convolution of one channel per group, here with a 5x3 kernel,
    padding (2, 1) and 11x9 images: the rewritten graph gives the same gradients."""

    def loss(w, x):  # w: (O, 1, 5, 3), x: (B, 1, 11, 9)
        return F.conv2d(x, w, padding=(2, 1)).square().sum()

    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 4, 1, 5, 3, generator=g, dtype=torch.float64)  # (N, O, 1, 5, 3)
    x = torch.randn(3, 2, 1, 11, 9, generator=g, dtype=torch.float64)  # (N, B, 1, 11, 9): each model's batch
    traced = make_fx(torch.func.vmap(torch.func.grad(loss)), tracing_mode="fake")(w, x)
    expected = traced(w, x)
    rewrite(traced.graph, ALWAYS)
    traced.recompile()
    assert conv_backwards(traced.graph) == 0
    torch.testing.assert_close(traced(w, x), expected, rtol=1e-12, atol=1e-12)


@needs_cpp_compiler
def test_compiled_gradients_take_the_rewrite_and_keep_autograds_values(monkeypatch):
    """fast's gradient as `train` compiles it, and lenet's for 3 models under vmap (groups of one
    channel), as the vmap-gradient route compiles it, with the rewrite forced (measured, this machine
    may prefer oneDNN's backward). Each graph calls convolution_backward for the second conv only."""
    monkeypatch.setattr(speed, "compile_options", lambda: {"post_grad_custom_post_pass": inductor_pass("always")})
    data = random_mnist(64, 1, seed=0)
    images, labels = data.train_images, data.train_labels
    fast = recipe_config("fast")
    lenet = recipe_config("lenet", seeds=3)
    cases = {
        "fast": (make_gradient(fast), networks.init_params("fast", 0), torch.arange(32)),
        "lenet x3": (
            vmapped(make_gradient(lenet)),
            {
                k: torch.stack([networks.init_params("lenet", s)[k] for s in range(3)])
                for k in networks.init_params("lenet", 0)
            },
            torch.arange(48).view(3, 16),
        ),
    }
    for name, (gradient, params, batch_idx) in cases.items():
        expected_grads, expected_loss = gradient(params, images, labels, batch_idx)
        (grads, loss), (code, *_) = run_and_get_code(compiled(gradient), params, images, labels, batch_idx)
        assert code.count("aten.convolution_backward.default(") == 1, name  # calls, not comments
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for key in expected_grads:
            scale = expected_grads[key].abs().max()
            torch.testing.assert_close(grads[key] / scale, expected_grads[key] / scale, rtol=0, atol=1e-5, msg=key)
