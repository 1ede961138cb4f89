"""Can N models on the CPU beat N single runs by running side by side, one model per core?

    python research/models_in_threads.py [--models cnn,fast,mlp] [--n 8] [--rounds 5]

Each network's compiled gradient (train.make_gradient, as one model's run computes it) is called
for N models three ways, timed in turns:

    in turn, all threads     one model after another, torch's threads (what one_by_one does)
    side by side, 1 thread   a pool of as many Python threads as torch has, each model's call on one
                             OpenMP thread (torch's eager kernels release the GIL;
                             inductor's Python-wrapper kernels do not, see transforms/side_by_side.py)
    in turn, 1 thread        one model after another on one thread: what each side-by-side call costs

If the cores had time to spare inside one model's step (barriers, serial stretches), the side by
side pool would beat "in turn, all threads". Random images; the gradient only (the update is one
vmapped call either way).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms.speed import compiled

N_IMAGES = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,fast,mlp")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch._dynamo.config.recompile_limit = 64  # train.py's one `gradient` code, compiled per model and thread count
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g)  # (60000, 28, 28)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g)  # (60000,)
    print(f"# {' '.join(sys.argv)}\n# torch {torch.__version__}, {threads} threads, cpu")
    print("# model, N: ms for N models' gradients: in turn all threads, side by side 1 thread, in turn 1 thread; ratio")
    pool = ThreadPoolExecutor(threads)
    for model in args.models.split(","):
        ways = side_by_side_ways(model, args.n, images, labels, pool)
        for way in ways.values():  # the compiles: one per thread count
            way()
        samples = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                started = time.perf_counter()
                way()
                samples[name].append(time.perf_counter() - started)
        ratio = statistics.median(b / a for a, b in zip(samples["in turn"], samples["side by side"], strict=True))
        ms = ", ".join(f"{statistics.median(s) * 1e3:.1f}" for s in samples.values())
        print(f"{model}, {args.n}: {ms}; side by side / in turn {ratio:.3f}x", flush=True)
        torch.set_num_threads(threads)


def side_by_side_ways(model: str, n: int, images, labels, pool: ThreadPoolExecutor) -> dict:
    """The three ways of computing N models' gradients, ready to call."""
    threads = torch.get_num_threads()
    config = recipe_config(model)
    gradient = compiled(make_gradient(config))
    params = [networks.init_params(model, seed) for seed in range(n)]
    batches = torch.randint(0, N_IMAGES, (n, config.batch_size), generator=torch.Generator().manual_seed(1))  # (N, B)

    def one(i):
        return gradient(params[i], images, labels, batches[i])

    def in_turn(count):
        torch.set_num_threads(count)
        for i in range(n):
            one(i)

    def side_by_side():
        torch.set_num_threads(1)
        list(pool.map(one, range(n)))

    return {"in turn": lambda: in_turn(threads), "side by side": side_by_side, "in turn 1": lambda: in_turn(1)}


if __name__ == "__main__":
    main()
