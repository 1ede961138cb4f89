"""transforms/speed.py's choices that no other test pins: the CPU micro-batch per network."""

import torch

from tinymnist.algorithm import networks
from tinymnist.transforms.speed import CPU_MICRO_BATCH, CPU_MICRO_BATCH_OF, default_micro_batch

CPU = torch.device("cpu")


def test_each_network_gets_its_own_cpu_micro_batch_split_between_models_that_share_it():
    assert set(CPU_MICRO_BATCH_OF) <= set(networks.MODEL_NAMES)
    for model in networks.MODEL_NAMES:
        own = CPU_MICRO_BATCH_OF.get(model, CPU_MICRO_BATCH)
        assert default_micro_batch(CPU, model) == own
        assert default_micro_batch(CPU, model, sharers=8) == own // 8  # 8 models' images in one chunk
        assert default_micro_batch(CPU, model, sharers=own + 1) == 1  # never an empty chunk
        assert default_micro_batch(torch.device("cuda"), model) == 0  # the whole batch off the CPU
    assert default_micro_batch(CPU, "fast") < default_micro_batch(CPU, "lenet")  # fast's maps fill the cache sooner
