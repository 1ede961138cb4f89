"""A recipe's single step called directly (transforms/direct_call.py), without inductor's per-call
checks of its inputs' sizes and strides (what `train` runs) and with them, in turns.

    python research/size_asserts.py [MODEL (mlp3)]

Both graphs are compiled in one process, then timed in 11 alternating rounds of about 0.4 s on
torch's threads; medians, and the median of the rounds' own ratios. Raw output:
results/bench/cpu-size-asserts-amd/.
"""

import statistics
import sys
import time

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.transforms.denormals import flush_denormals
from tinymnist.transforms.direct_call import called_directly
from tinymnist.transforms.freed_memory import reuse_freed_memory
from tinymnist.transforms.speed import compile_options

flush_denormals()  # as `tinymnist` does at its start
reuse_freed_memory()
model = sys.argv[1] if len(sys.argv) > 1 else "mlp3"
config = recipe_config(model)
optimizer = make_optimizer(config)
state = initial_state(config, optimizer, "cpu")
images = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8)
labels = torch.randint(0, 10, (60000,))
batches = torch.randint(0, 60000, (16, config.batch_size))  # 16 batches' indices, reused in turn
lr = torch.tensor(config.lr)
step = make_step(make_gradient(config), optimizer)
steps = {
    "without": called_directly(step, compile_options()),
    "with": called_directly(step, compile_options() | {"size_asserts": True}),
}
carried = {}
for name, f in steps.items():  # compile, then a few steps
    p, s = state.params, state.opt_state
    for i in range(20):
        p, s, _ = f(p, s, images, labels, batches[i % 16], lr)
    carried[name] = p, s
times = {name: [] for name in steps}
for r in range(11):
    for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
        f, (p, s) = steps[name], carried[name]
        started, n = time.perf_counter(), 0
        while time.perf_counter() - started < 0.4:
            for idx in batches:
                p, s, _ = f(p, s, images, labels, idx, lr)
                n += 1
        times[name].append((time.perf_counter() - started) / n * 1e6)
        carried[name] = p, s
ratio = statistics.median(a / b for a, b in zip(times["without"], times["with"], strict=True))
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model}, batch {config.batch_size}")
for name, t in times.items():
    print(f"{name:>7} size asserts: {statistics.median(t):7.1f} us a step  rounds {[round(x) for x in t]}")
print(f"without / with: {ratio:.3f}x the time")
