"""A speed trick for N models on a CPU: their gradients side by side, one model per core.

One model's compiled step leaves part of a small CPU idle (barriers, serial stretches: on one
thread cnn and fast take 1.6x their two-thread time, not 2x). Here N models' gradients run on
a pool of Python threads, each on one OpenMP thread, as many at once as the caller has threads
(AdaptiveThreads lowers that while another program takes a core), so that the cores stay busy
with whole models. Two conditions make it pay and keep it exact:

- The compiled gradient releases Python's GIL for its whole graph: inductor's C++ wrapper does
  (`cpp_wrapper`: fast's first step 8.3 s against 3.6 s); its default Python wrapper holds the GIL in every
  generated kernel. fast, 8 models: 0.89x the time of 8 single runs without the GIL, 1.08x
  with it, 1.07x one after another (research/wide_conv.py, results/bench/cpu-seeds/side-by-side-fast.txt).
  Where the single step is called directly (direct_call.py), so is this gradient: the same kernels, with
  less work a call, and N models run as the single runs they are compared with. Against torch.compile, in
  turns (research/side_by_side_direct.py, 8 models, two runs of 20 rounds): fast 0.985x and 0.973x, lenet
  1.075x and 0.967x, no gain beyond the noise. 8 models took 0.89x and 0.88x (lenet), 0.75x and 0.84x (fast)
  the time of 8 single runs (`tinymnist bench --seeds 1,8`; results/bench/cpu-issue20-amd/). Since one model's
  step got faster (fast's first block one product, lenet's batch in one piece): fast 0.82-0.91x, lenet
  1.00-1.11x (results/bench/cpu-whole-batch-amd/; lanes stay in chunks of 256, speed.CPU_MICRO_BATCH).
- The network draws no random numbers. Dropout draws from torch's one generator, and threads
  would draw in no fixed order, so a seeded run would not repeat: cnn keeps one_by_one.

Each model's gradient is its single run's arithmetic on one thread, whichever thread runs it and
however many run beside it; the result is in model order.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.shapes import Dropout
from tinymnist.algorithm.train import Gradient
from tinymnist.transforms.vmap import one_model


def draws_random_numbers(model: str) -> bool:
    """Whether the network's training forward draws from torch's generator (dropout)."""
    return any(isinstance(layer, Dropout) for layer in networks.ARCHITECTURES[model])


def models_on_cores(gradient: Gradient, workers: int) -> Gradient:
    """One model's `gradient` (speed.compiled with the C++ wrapper) over N stacked models, side by side on up to
    `workers` Python threads of one OpenMP thread each; the grads and losses stacked in model order."""
    # The initializer puts each worker on one OpenMP thread (torch.set_num_threads is per thread
    # here, and also what threads started later begin with; tinymnist starts none).
    pool = ThreadPoolExecutor(workers, "tinymnist-model", initializer=torch.set_num_threads, initargs=(1,))
    compiled = False

    def gradients(params, images, labels, batch_idx):  # params: leaves (N, ...), batch_idx: (N, B)
        nonlocal compiled

        def run(i: int):  # model i's gradient
            return gradient(one_model(params, i), images, labels, batch_idx[i])

        n_models, done = len(batch_idx), {}
        if not compiled:  # the compile, on this thread (Ctrl-C can stop it) and for one thread, as the workers run it
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                done[0] = run(0)
            finally:
                torch.set_num_threads(threads)
            compiled = True
        waiting, take, stop = iter(range(len(done), n_models)), threading.Lock(), threading.Event()

        def lane() -> dict:  # the next waiting model whenever this lane is free, until none is left or one fails
            out = {}
            while not stop.is_set():
                with take:
                    i = next(waiting, None)
                if i is None:
                    break
                try:
                    out[i] = run(i)
                except BaseException:
                    stop.set()
                    raise
            return out

        # As many lanes as the caller has threads: AdaptiveThreads lowers that while a core is taken.
        futures = [pool.submit(lane) for _ in range(min(workers, torch.get_num_threads()))]
        try:
            for future in futures:
                done.update(future.result())
        finally:  # Ctrl-C: the lanes start no further model
            stop.set()
        each = [done[i] for i in range(n_models)]  # model order, whichever lane ran each
        grads = {name: torch.stack([g[name] for g, _ in each]) for name in each[0][0]}  # leaves (N, ...)
        return grads, torch.stack([loss for _, loss in each])  # (N,)

    return gradients
