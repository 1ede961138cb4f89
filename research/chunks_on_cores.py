"""One model's micro-batches side by side, one per core, against train's step (the micro-batches one
after another, each on both cores).

    train's          speed.device_step: each micro-batch's compiled gradient on 2 OpenMP threads, in turn
    chunks on cores  the micro-batches on 2 Python threads of one OpenMP thread each, the gradient compiled
                     with inductor's C++ wrapper (it releases the GIL), as side_by_side.py runs N models
    half chunks ...  the same with micro-batches of half the size: two in flight take one's cache

    python research/chunks_on_cores.py --data-dir DIR [--models fast,lenet] [--rounds 9] [--seconds 1]
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import torch
from in_turns import print_against, steps_in_turns, turns_parser  # research/in_turns.py

from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed


def chunks_on_cores(divide: int = 1):
    return functools.partial(chunks_on_cores_of, divide)


def on_cores(gradient, micro_batch: int, lanes: int):
    """speed.micro_batched's gradient, chunk i added into partial sum i % lanes, each partial sum on a Python
    thread of one OpenMP thread (the first call on this thread: it compiles), then the partial sums added."""
    pool = ThreadPoolExecutor(lanes, initializer=torch.set_num_threads, initargs=(1,))
    first = [True]

    def chunked_gradient(params, images, labels, batch_idx):
        chunks = batch_idx.split(micro_batch, dim=-1)
        parts = [chunks[j::lanes] for j in range(min(lanes, len(chunks)))]

        def partial_sum(part):
            return speed_micro_batched(gradient, micro_batch)(params, images, labels, torch.cat(part)), len(part)

        if first[0]:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            sums = [partial_sum(part) for part in parts]
            torch.set_num_threads(threads)
            first[0] = False
        else:
            sums = list(pool.map(partial_sum, parts))
        share = [n * micro_batch / batch_idx.shape[-1] for _, n in sums]  # (the batch a multiple of micro_batch)
        grads = {k: sum(g[k] * w for ((g, _), _), w in zip(sums, share, strict=True)) for k in sums[0][0][0]}
        return grads, sum(loss * w for ((_, loss), _), w in zip(sums, share, strict=True))

    return chunked_gradient


@contextlib.contextmanager
def chunks_on_cores_of(divide: int):
    def micro_batched(gradient, micro_batch):
        return on_cores(gradient, micro_batch // divide, torch.get_num_threads())

    def compiled(fn, direct=False, cpp_wrapper=False):  # the gradient without the GIL, the update as train's
        if fn.__name__ == "gradient":
            return speed_compiled(fn, cpp_wrapper=True)
        return speed_compiled(fn, direct, cpp_wrapper)

    with mock.patch.object(speed, "micro_batched", micro_batched), mock.patch.object(speed, "compiled", compiled):
        yield


speed_compiled, speed_micro_batched = speed.compiled, speed.micro_batched
WAYS = {
    "train's": contextlib.nullcontext,
    "chunks on cores": chunks_on_cores(),
    "half chunks on cores": chunks_on_cores(2),
}


def main():
    parser = turns_parser(__doc__, seconds=1.0)
    parser.set_defaults(rounds=9)
    args = parser.parse_args()
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}", flush=True)
    for model in args.models.split(","):
        print_against(model, steps_in_turns(model, images, labels, WAYS, args.rounds, args.seconds))


if __name__ == "__main__":
    main()
