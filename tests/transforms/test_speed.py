"""transforms/speed.py's choices that no other test pins: the CPU micro-batch, and which forward the step runs."""

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.transforms import polyphase, speed
from tinymnist.transforms.speed import CPU_MICRO_BATCH, default_micro_batch

CPU = torch.device("cpu")


def test_the_cpu_micro_batch_is_split_between_models_that_share_it():
    assert default_micro_batch(CPU) == CPU_MICRO_BATCH
    assert default_micro_batch(CPU, sharers=8) == CPU_MICRO_BATCH // 8  # 8 models' images in one chunk
    assert default_micro_batch(CPU, sharers=CPU_MICRO_BATCH + 1) == 1  # never an empty chunk
    assert default_micro_batch(torch.device("cuda")) == 0  # the whole batch off the CPU


def test_the_compiled_cpu_step_runs_the_first_block_as_one_product_where_measured_faster():
    assert speed.CPU_POLYPHASE <= set(polyphase.TEMPLATES)  # only networks it can compute
    for model in networks.MODEL_NAMES:
        config = recipe_config(model)
        taken = model in speed.CPU_POLYPHASE
        assert speed.network_apply(config, CPU, compile=True) is (polyphase.apply if taken else networks.apply)
        assert speed.network_apply(config, CPU, compile=False) is networks.apply  # eager: the layers
        assert speed.network_apply(config, torch.device("cuda"), compile=True) is networks.apply
    assert "fast" in speed.CPU_POLYPHASE and "lenet" not in speed.CPU_POLYPHASE  # lenet's measured slower
