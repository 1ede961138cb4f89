"""transforms/speed.py's choices that no other test pins: the CPU micro-batch, and which forward the step runs."""

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms import polyphase, speed, vmap
from tinymnist.transforms.speed import CPU_MICRO_BATCH, default_micro_batch

CPU = torch.device("cpu")


def test_one_model_takes_its_batch_whole_and_n_models_take_cpu_chunks():
    assert default_micro_batch(CPU) == 0  # lenet's 8192 images too: measured faster than chunks of 256
    assert default_micro_batch(CPU, models=8) == CPU_MICRO_BATCH  # each model's, when they run apart
    assert default_micro_batch(CPU, models=8, sharers=8) == CPU_MICRO_BATCH // 8  # 8 models' images in one chunk
    assert default_micro_batch(CPU, models=300, sharers=300) == 1  # never an empty chunk
    assert default_micro_batch(torch.device("cuda"), models=8) == 0  # the whole batch off the CPU


def test_the_compiled_cpu_step_runs_the_first_block_as_one_product_where_measured_faster():
    assert speed.CPU_POLYPHASE <= set(polyphase.TEMPLATES)  # only networks it can compute
    for model in networks.MODEL_NAMES:
        config = recipe_config(model)
        taken = model in speed.CPU_POLYPHASE
        assert speed.network_apply(config, CPU, compile=True) is (polyphase.apply if taken else networks.apply)
        assert speed.network_apply(config, CPU, compile=False) is networks.apply  # eager: the layers
        assert speed.network_apply(config, torch.device("cuda"), compile=True) is networks.apply
    assert "fast" in speed.CPU_POLYPHASE and "lenet" not in speed.CPU_POLYPHASE  # lenet's measured slower


def test_every_cpu_step_train_builds_for_fast_runs_the_product_compiled_and_the_layers_eager(monkeypatch):
    """One run, N = 1 of the N-model step, N models side by side (or one by one) and data parallelism:
    each builds its gradient with the forward network_apply chose (nothing compiles here)."""
    applies = []

    def spy(config, apply=networks.apply):
        applies.append(apply)
        return make_gradient(config, apply)

    monkeypatch.setattr(speed, "make_gradient", spy)
    monkeypatch.setattr(vmap, "make_gradient", spy)
    monkeypatch.setattr(speed, "called_directly", lambda fn, options: fn)
    monkeypatch.setattr(speed.torch, "compile", lambda fn, **kwargs: fn)
    for compile, expected in [(True, polyphase.apply), (False, networks.apply)]:
        for seeds, stacked, data_parallel in [
            (1, False, None),
            (1, True, None),
            (2, None, None),
            (3, None, None),
            (1, False, lambda g: g),
        ]:
            applies.clear()
            config = recipe_config("fast", compile=compile, seeds=seeds)
            speed.device_step(config, make_optimizer(config), CPU, data_parallel, stacked=stacked)
            assert applies and all(apply is expected for apply in applies), (compile, seeds, stacked)


def test_lenets_step_takes_its_batch_whole_and_n_lenets_take_chunks_of_the_cpu_micro_batch(monkeypatch):
    """The wiring of default_micro_batch's choice: device_step splits no batch of one model, and each
    model's batch of N models in chunks of CPU_MICRO_BATCH (nothing compiles or runs here)."""
    chunks = []

    def spy(gradient, micro_batch):
        chunks.append(micro_batch)
        return speed_micro_batched(gradient, micro_batch)

    speed_micro_batched = speed.micro_batched
    monkeypatch.setattr(speed, "micro_batched", spy)
    for seeds, expected in [(1, []), (2, [CPU_MICRO_BATCH]), (3, [CPU_MICRO_BATCH])]:
        chunks.clear()
        config = recipe_config("lenet", compile=False, seeds=seeds)
        speed.device_step(config, make_optimizer(config), CPU)
        assert chunks == expected, seeds
    chunks.clear()
    config = recipe_config("lenet", compile=False, micro_batch=512)  # a value given is taken
    speed.device_step(config, make_optimizer(config), CPU)
    assert chunks == [512]
