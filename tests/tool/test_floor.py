"""`tinymnist bench --floor`: the floor's arithmetic (FLOPs by hand and by torch's FLOP
counter), its measurements' layout, the report, and what does not combine with it."""

import json
import statistics

import pytest
import torch
from torch.autograd import profiler_legacy
from torch.utils.flop_counter import FlopCounterMode

from tests.support import assert_user_error, needs_cpp_compiler, run
from tinymnist.algorithm import networks
from tinymnist.tool import floor


def test_fast_products_counted_by_hand():
    layers = {p.layer.name: p for p in floor.product_layers("fast")}
    by_hand = {
        "conv1": 24 * 24 * 24 * 1 * 5 * 5,  # 24 maps of 24x24, each value 1 channel x 5x5
        "conv2": 32 * 10 * 10 * 24 * 3 * 3,  # 32 maps of 10x10 from 24 channels x 3x3
        "fc1": 800 * 256,
        "fc2": 256 * 10,
    }
    assert {name: p.macs() for name, p in layers.items()} == by_hand
    assert [name for name, p in layers.items() if p.first] == ["conv1"]  # the image needs no gradient
    # conv1: forward and weight gradient; every other layer adds its input gradient
    expected = 2 * 256 * (2 * by_hand["conv1"] + 3 * (by_hand["conv2"] + by_hand["fc1"] + by_hand["fc2"]))
    assert floor.step_flops("fast", 256) == expected == 1_734_082_560


@pytest.mark.parametrize("model", networks.MODEL_NAMES)
def test_forward_flops_match_torch_flop_counter(model):
    batch = 3
    params = networks.init_params(model, 0)
    with FlopCounterMode(display=False) as counter:
        networks.apply(model, params, torch.zeros(batch, 1, 28, 28))
    assert counter.get_total_flops() == sum(2 * batch * p.macs() for p in floor.product_layers(model))


@pytest.mark.parametrize("model", ["mlp", "mlp3"])
def test_step_flops_match_torch_flop_counter_on_autograd(model):
    """Forward and backward of the linear networks, as autograd runs them: no input gradient
    for the first layer. (The counter charges a conv's input gradient per input position rather
    than per output position; the floor counts as many multiply-adds as the forward product.)"""
    batch = 5
    params = {k: v.requires_grad_() for k, v in networks.init_params(model, 0).items()}
    with FlopCounterMode(display=False) as counter:
        networks.apply(model, params, torch.zeros(batch, 1, 28, 28)).sum().backward()
    assert counter.get_total_flops() == floor.step_flops(model, batch)


@pytest.mark.parametrize("model", networks.MODEL_NAMES)
def test_each_product_has_the_shape_autograd_gives(model):
    template = dict(networks.TEMPLATES[model].named_children())
    for p in floor.product_layers(model):
        out = {name: call().shape for name, call in floor.product_calls(p, batch=2).items()}
        assert out["forward"] == (2, *p.shape_out)
        assert out["weight_grad"] == out.get("weight_grad_as_forward", out["weight_grad"])
        assert out["weight_grad"] == template[p.layer.name].weight.shape
        assert out.get("input_grad", (2, *p.shape_in)) == (2, *p.shape_in)


@pytest.mark.parametrize("model", ["cnn", "lenet", "fast"])
def test_a_first_convs_two_weight_gradient_kernels_agree(model):
    """The floor times two kernels for a one-channel conv's weight gradient: both give it."""
    torch.manual_seed(0)
    calls = floor.product_calls(floor.product_layers(model)[0], batch=3)
    expected = calls["weight_grad"]()
    scale = expected.abs().max()  # sums of ~10^3 float32 products, added in another order
    torch.testing.assert_close(calls["weight_grad_as_forward"]() / scale, expected / scale, rtol=0, atol=1e-5)


def test_the_floor_counts_each_product_by_its_faster_kernel():
    times = {"conv1.weight_grad@8": 50.0, "conv1.weight_grad_as_forward@8": 20.0, "conv1.forward@8": 5.0}
    times |= {"conv2.weight_grad@8": 7.0}
    assert floor.cheapest_total(times) == 20.0 + 5.0 + 7.0
    assert floor.cheapest_total(times | {"conv1.weight_grad_as_forward@8": 90.0}) == 50.0 + 5.0 + 7.0


def profiled_events(fn, calls: int = 20):
    with profiler_legacy.profile() as profile:
        for _ in range(calls):
            fn()
    return profile.function_events


def test_a_convolutions_forward_and_backward_are_products():
    """aten::convolution (with the oneDNN call under it) and aten::convolution_backward, each whole,
    and nothing else: they fill most of a window of nothing else."""
    x, weight = torch.randn(64, 8, 28, 28, requires_grad=True), torch.randn(16, 8, 3, 3, requires_grad=True)
    events = profiled_events(lambda: torch.nn.functional.conv2d(x, weight).sum().backward())
    convolutions = [e for e in events if e.name in ("aten::convolution", "aten::convolution_backward")]
    assert len(convolutions) == 2 * 20 and {e.name for e in events} >= {"aten::_convolution"}
    assert floor.products_seconds(events) == pytest.approx(sum(e.cpu_time_total for e in convolutions) / 1e6)
    assert 0.5 < floor.products_seconds(events) / floor.window_seconds(events) <= 1.0


@needs_cpp_compiler
def test_every_product_of_a_compiled_step_is_counted():
    """mlp3's compiled CPU step: every product call the profiler sees is one of PRODUCT_OPS or runs inside
    one, and there are as many as the floor's products (4 forwards, 4 weight and 3 input gradients)."""
    images, labels = torch.zeros(64, 28, 28, dtype=torch.uint8), torch.zeros(64, dtype=torch.int64)
    steps = floor.cpu_steps("mlp3", images, labels)
    for _ in range(3):  # the compile, then two more
        next(steps)
    events = profiled_events(lambda: next(steps), calls=5)
    looks_like_a_product = [e for e in events if any(word in e.name for word in ("mm", "conv", "matmul", "linear"))]
    counted = [e for e in looks_like_a_product if e.name in floor.PRODUCT_OPS]
    assert all(e in counted or any(a in counted for a in ancestors(e)) for e in looks_like_a_product)
    top_level = [e for e in counted if not any(a in counted for a in ancestors(e))]
    per_step = sum(len(p.products()) for p in floor.product_layers("mlp3"))
    assert per_step == 11 and len(top_level) == 5 * per_step


def ancestors(event):
    while (event := event.cpu_parent) is not None:
        yield event


def test_a_product_called_inside_a_product_is_counted_once():
    """A product op whose kernel calls another (here made so with a named scope around aten::mm)
    is counted with what it calls, once: counted at both levels, the window would hold twice itself."""
    x = torch.randn(512, 512)

    def nested():
        with torch.autograd.profiler.record_function("aten::mm"):
            x @ x.t()

    events = profiled_events(nested)
    inner = [e for e in events if e.name == "aten::mm" and e.cpu_parent is not None]
    assert len(inner) == 20 and all(e.cpu_parent.cpu_parent.name == "aten::mm" for e in inner)  # under matmul
    assert 0.5 < floor.products_seconds(events) / floor.window_seconds(events) <= 1.0


def test_elementwise_work_is_not_a_product():
    x = torch.randn(256, 1024)
    events = profiled_events(lambda: torch.relu(x * 2 + 1))
    assert floor.products_seconds(events) == 0 < floor.window_seconds(events)
    matmuls = profiled_events(lambda: x @ x.t())
    assert floor.products_seconds(matmuls) > 0.5 * floor.window_seconds(matmuls)


def test_optimizer_arrays_by_hand():
    # read the gradient; read and write the parameters and each state tensor of the same size
    assert floor.optimizer_arrays("mlp") == 1 + 2 * 3  # adam: exp_avg, exp_avg_sq
    assert floor.optimizer_arrays("cnn") == 1 + 2 * 3  # adadelta: square_avg, acc_delta
    assert floor.optimizer_arrays("lenet") == 1 + 2 * 2  # rmsprop: square_avg


def test_floor_parts_time_the_step_micro_batches():
    parts = floor.floor_parts("lenet", batch=20, micro_batch=8)  # chunks of 8, 8 and 4
    assert list(parts) == ["whole", "micro", "optimizer"]
    assert "conv1.input_grad" not in parts["whole"] and parts["whole"]["fc3.input_grad"].weight == 1
    assert parts["micro"]["conv2.weight_grad@8"].weight == 2 and parts["micro"]["conv2.weight_grad@4"].weight == 1
    # conv1: 2 products, the weight gradient by two kernels; 4 more layers: 3 products each
    assert len(parts["micro"]) == 2 * len(parts["whole"]) == 2 * (3 + 4 * 3)
    assert parts["optimizer"]["traffic"].weight == 5 / 3  # rmsprop's 5 arrays, timed as a 3-array add


@needs_cpp_compiler
def test_floor_bench_reports_the_step_k_steps_and_floor(tmp_path, monkeypatch):
    """mlp3's compiled step, 10 steps per call and the floor, two rounds: the JSON's
    medians and per-round ratios agree with its samples, and the table shows them."""
    monkeypatch.setattr(floor, "STEP_SECONDS", 0.02)
    monkeypatch.setattr(floor, "PRODUCT_SECONDS", 0.001)
    out = tmp_path / "floor.json"
    args = ("--models", "mlp3", "--floor", "--device", "cpu", "--repeats", 2, "--json", out)
    result = run("bench", *args, "--data-dir", tmp_path / "none")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["results"]
    samples = row["samples_us"]
    assert row["model"] == "mlp3" and row["batch"] == 15 and row["k_steps_refused"] is None
    assert all(len(values) == 2 for values in samples.values())
    floors = [p + o for p, o in zip(samples["whole"], samples["optimizer"], strict=True)]  # no micro-batches
    for loop in ("step", "k_steps"):
        assert row[f"{loop}_us"] == statistics.median(samples[loop])
        ratio = statistics.median(s / f for s, f in zip(samples[loop], floors, strict=True))
        assert row[f"{loop}_over_floor"] == pytest.approx(ratio)
        assert f"{ratio:.2f}x" in result.stdout
    assert row["floor_us"] == pytest.approx(statistics.median(floors))
    products = [name for name in samples if name.startswith("whole/")]
    assert len(products) == 2 + 3 * 3  # fc1: forward and weight gradient; fc2-fc4: all three
    # where the step's time goes: each round's profiled share of it in the products, and the rest
    shares = row["step_products_shares"]
    assert len(shares) == 2 and all(0 < share < 1 for share in shares)
    in_step = [share * step for share, step in zip(shares, samples["step"], strict=True)]
    assert row["step_products_us"] == pytest.approx(statistics.median(in_step))
    assert row["step_rest_us"] == pytest.approx(row["step_us"] - row["step_products_us"])  # a row adds up
    assert len(row["profiled_step_us"]) == 2
    ratio = statistics.median(p / q for p, q in zip(in_step, samples["whole"], strict=True))
    assert row["step_products_over_products"] == pytest.approx(ratio)
    assert f"{ratio:.2f}x" in result.stdout.split("Where the step's time goes")[1]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--seeds", "1,8"], "--seeds does not apply to --floor"),
        (["--window-images", "64"], "--window-images does not apply to --floor"),
        (["--device", "cuda"], "use --device cpu"),
        (["--no-compile"], "leave out --no-compile"),
        (["--busy-core"], "give one of them"),
        (["--warmup", "5"], "--warmup does not apply to --floor"),
    ],
)
def test_floor_refuses_what_does_not_combine(tmp_path, flags, fragment):
    result = run("bench", "--floor", "--models", "mlp", *flags, "--data-dir", tmp_path)
    assert_user_error(result, fragment)
