"""A speed trick for N models on a CPU: their gradients side by side, one model per core.

One model's compiled step leaves part of a small CPU idle (barriers, serial stretches: on one
thread cnn and fast take 1.6x their two-thread time, not 2x). Here N models' gradients run on
a pool of Python threads, each on one OpenMP thread, as many at once as the caller has threads
(AdaptiveThreads lowers that while another program takes a core), so that the cores stay busy
with whole models. Two conditions make it pay and keep it exact:

- The compiled gradient releases Python's GIL for its whole graph: inductor's C++ wrapper does
  (`cpp_wrapper`, about 10 s more compile); its default Python wrapper holds the GIL in every
  generated kernel. fast, 8 models: 0.89x the time of 8 single runs without the GIL, 1.08x
  with it, 1.07x one after another (research/wide_conv.py, results/bench/cpu-seeds/side-by-side-fast.txt).
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
from tinymnist.algorithm.trees import tree_map


def draws_random_numbers(model: str) -> bool:
    """Whether the network's training forward draws from torch's generator (dropout)."""
    return any(isinstance(layer, Dropout) for layer in networks.ARCHITECTURES[model])


def compiled_without_gil(fn, options: dict):
    """torch.compile as speed.compiled does, with inductor's C++ wrapper: the graph runs with the GIL released."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options | {"cpp_wrapper": True})


def side_by_side(gradient: Gradient, workers: int) -> Gradient:
    """One model's `gradient` (compiled_without_gil) over N stacked models, side by side on up to
    `workers` Python threads of one OpenMP thread each; the grads and losses stacked in model order."""
    # torch.set_num_threads in a worker sets that thread's OpenMP count; the caller's stays.
    pool = ThreadPoolExecutor(workers, "tinymnist-model", initializer=torch.set_num_threads, initargs=(1,))
    compiled_once = [False]

    def gradients(params, images, labels, batch_idx):  # params: leaves (N, ...), batch_idx: (N, B)
        def model(i):
            return gradient(tree_map(lambda leaf: leaf[i], params), images, labels, batch_idx[i])

        n_models, done = len(batch_idx), {}
        if not compiled_once[0]:  # one compile, before threads share the compiled code
            done[0] = pool.submit(model, 0).result()
            compiled_once[0] = True
        # As many lanes as the caller has threads: AdaptiveThreads lowers that while a core is taken.
        lanes, stop = min(workers, torch.get_num_threads()), threading.Event()

        def lane(models: range) -> dict:  # its models one after another, until another lane fails
            return {i: model(i) for i in models if not stop.is_set()}

        waiting = range(len(done), n_models)
        futures = [pool.submit(lane, waiting[k::lanes]) for k in range(lanes)]
        try:
            for future in futures:
                done.update(future.result())
        finally:  # an error or Ctrl-C: the other lanes start no further model
            stop.set()
        each = [done[i] for i in range(n_models)]  # model order, whichever lane ran each
        grads = {name: torch.stack([g[name] for g, _ in each]) for name in each[0][0]}  # leaves (N, ...)
        return grads, torch.stack([loss for _, loss in each])  # (N,)

    return gradients
