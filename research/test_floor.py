"""research/floor_products.py and research/cpu_floor.py: the floor's arithmetic (FLOPs by hand and
by torch's FLOP counter), its measurements' layout, and cpu_floor's one-line refusals.

    python -m pytest -q research

Not part of the product's suite (pyproject.toml's testpaths is tests/)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tinymnist.algorithm import networks

RESEARCH = Path(__file__).resolve().parent


@pytest.fixture
def products(monkeypatch):
    """research/floor_products.py, what research/cpu_floor.py times, as a module."""
    monkeypatch.syspath_prepend(str(RESEARCH))
    return importlib.import_module("floor_products")


def test_fast_products_counted_by_hand(products):
    layers = {p.layer.name: p for p in products.product_layers("fast")}
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
    assert products.step_flops("fast", 256) == expected == 1_734_082_560


@pytest.mark.parametrize("model", networks.MODEL_NAMES)
def test_forward_flops_match_torch_flop_counter(products, model):
    batch = 3
    params = networks.init_params(model, 0)
    with FlopCounterMode(display=False) as counter:
        networks.apply(model, params, torch.zeros(batch, 1, 28, 28))
    assert counter.get_total_flops() == sum(2 * batch * p.macs() for p in products.product_layers(model))


@pytest.mark.parametrize("model", ["mlp", "mlp3"])
def test_step_flops_match_torch_flop_counter_on_autograd(products, model):
    """Forward and backward of the linear networks, as autograd runs them: no input gradient
    for the first layer. (The counter charges a conv's input gradient per input position rather
    than per output position; the floor counts as many multiply-adds as the forward product.)"""
    batch = 5
    params = {k: v.requires_grad_() for k, v in networks.init_params(model, 0).items()}
    with FlopCounterMode(display=False) as counter:
        networks.apply(model, params, torch.zeros(batch, 1, 28, 28)).sum().backward()
    assert counter.get_total_flops() == products.step_flops(model, batch)


@pytest.mark.parametrize("model", networks.MODEL_NAMES)
def test_each_product_has_the_shape_autograd_gives(products, model):
    template = dict(networks.TEMPLATES[model].named_children())
    for p in products.product_layers(model):
        out = {name: call().shape for name, call in products.product_calls(p, batch=2).items()}
        assert out["forward"] == (2, *p.shape_out)
        assert out["weight_grad"] == template[p.layer.name].weight.shape
        assert out.get("input_grad", (2, *p.shape_in)) == (2, *p.shape_in)


def test_optimizer_arrays_by_hand(products):
    # read the gradient; read and write the parameters and each state tensor of the same size
    assert products.optimizer_arrays("mlp") == 1 + 2 * 3  # adam: exp_avg, exp_avg_sq
    assert products.optimizer_arrays("cnn") == 1 + 2 * 3  # adadelta: square_avg, acc_delta
    assert products.optimizer_arrays("lenet") == 1 + 2 * 2  # rmsprop: square_avg


def test_floor_parts_time_the_step_micro_batches(products):
    parts = products.floor_parts("lenet", batch=20, micro_batch=8)  # chunks of 8, 8 and 4
    assert list(parts) == ["whole", "micro", "optimizer"]
    assert "conv1.input_grad" not in parts["whole"] and parts["whole"]["fc3.input_grad"].weight == 1
    assert parts["micro"]["conv2.weight_grad@8"].weight == 2 and parts["micro"]["conv2.weight_grad@4"].weight == 1
    assert len(parts["micro"]) == 2 * len(parts["whole"]) == 2 * (2 + 4 * 3)  # conv1: 2 products, 4 layers: 3
    assert parts["optimizer"]["traffic"].weight == 5 / 3  # rmsprop's 5 arrays, timed as a 3-array add


def test_cpu_floor_refuses_bad_flags_in_one_line(tmp_path):
    missing_folder = str(tmp_path / "missing" / "floor.json")
    for flags in (["--models", "mlp,resnet"], ["--cpu-time"], ["--json", missing_folder], ["--rounds", "x"]):
        result = subprocess.run(
            [sys.executable, RESEARCH / "cpu_floor.py", *flags], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 1 and result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith("cpu_floor: error: ") and flags[0] in line
    assert os.listdir(tmp_path) == []
