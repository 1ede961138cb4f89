"""A recipe's compiled CPU step with inductor's default Python wrapper against its cpp_wrapper, in turns.

    python research/cpp_wrapper.py [MODEL (mlp3)] [THREADS] > results/bench/cpp-wrapper.txt

Both steps are compiled in one process (the first line of each says how long the compile and
5 steps took, cold or from the cache), then timed in 7 alternating rounds of 500 steps on
one random batch; the median round counts.
"""

import statistics
import sys
import time

import torch

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step

model = sys.argv[1] if len(sys.argv) > 1 else "mlp3"
if len(sys.argv) > 2:
    torch.set_num_threads(int(sys.argv[2]))
config = recipe_config(model)
opt = make_optimizer(config)
state = initial_state(config, opt, "cpu")
images = torch.randint(0, 256, (60000, 28, 28), dtype=torch.uint8)
labels = torch.randint(0, 10, (60000,))
idx = torch.randint(0, 60000, (config.batch_size,))
lr = torch.tensor(config.lr)
steps = {}
for name, options in {"python wrapper": None, "cpp_wrapper": {"cpp_wrapper": True}}.items():
    t = time.perf_counter()
    f = torch.compile(make_step(make_gradient(config), opt), fullgraph=True, dynamic=False, options=options)
    p, s = state.params, state.opt_state
    for _ in range(5):
        p, s, _ = f(p, s, images, labels, idx, lr)
    print(f"{name}: compile + 5 steps {time.perf_counter() - t:.1f} s", flush=True)
    steps[name] = [f, p, s]
times = {n: [] for n in steps}
for _ in range(7):
    for name, st in steps.items():
        f, p, s = st
        t = time.perf_counter()
        for _ in range(500):
            p, s, loss = f(p, s, images, labels, idx, lr)
        times[name].append((time.perf_counter() - t) / 500 * 1e6)
        st[1], st[2] = p, s
for n, v in times.items():
    print(f"{model} {n:15} {statistics.median(v):7.1f} us/step  rounds {[round(x) for x in v]}")
