"""The sign of a taken core that transforms/cpu_threads.py reads: CPU seconds per second.

Each recipe's compiled step on torch's fixed threads, five periods of 0.2 s quiet, then
five while `tinymnist bench --busy-core`'s child process spins on one core, then quiet
again: the process's CPU time (time.process_time) over the wall time of each period.

    python research/cpu_busy_signal.py

Raw output: results/bench/cpu-busy-core/busy-signal.txt.
"""

import contextlib
import time

import torch

from tinymnist.algorithm.config import recipe_config
from tinymnist.tool.bench import bench_data, our_steps, warm_up
from tinymnist.tool.busy_core import busy_core

images, labels, _ = bench_data("data", torch.device("cpu"))
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: CPU seconds per second, 5 periods")
for model in ("mlp", "mlp3", "cnn", "lenet"):
    config = recipe_config(model)
    steps = our_steps(config, images, labels, torch.device("cpu"), True, adaptive_threads=False)
    warm_up(steps, torch.device("cpu"), 3)
    for load in ("quiet", "busy", "quiet"):
        with busy_core() if load == "busy" else contextlib.nullcontext():
            cores = []
            for _ in range(5):
                wall, cpu, n = time.perf_counter(), time.process_time(), 0
                while time.perf_counter() - wall < 0.2 or n < 2:
                    next(steps)
                    n += 1
                cores.append(round((time.process_time() - cpu) / (time.perf_counter() - wall), 2))
        print(f"{model:6} {load:6} {cores}", flush=True)
