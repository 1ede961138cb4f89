"""The CPU step's compiled graphs called through torch.compile against the same graphs called directly
(transforms/direct_call.py), and the micro-batches in one compiled graph, each way timed in turns. Every
way splits the batch in chunks of speed.CPU_MICRO_BATCH, as train did by default until 2026-12-07 (lenet:
32 chunks of 256; fast's 256 images and the smaller batches are one chunk).

    torch.compile     speed.device_step with no network in speed.CPU_DIRECT_CALL: every call of a compiled
                      graph (lenet: 32 micro-batches' gradients and the update a step) through dynamo's
                      entry, the micro-batches' loop and sums in Python
    direct            the same graphs called directly (train's way since 2026-12-07)
    one graph         speed.micro_batched inside the step, the whole step one torch.compile'd graph
    one graph direct  that graph called directly

Ratios are against the first way given. Many short rounds: on a noisy 2-core host single rounds swing
by 20%, and a few-percent gain shows only in the median of many paired ratios.

    python research/one_graph_micro.py --data-dir DIR [--models fast,lenet,cnn] [--ways a,b] [--rounds 40]
        [--seconds 0.25]
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from in_turns import print_against, steps_in_turns, turns_parser  # research/in_turns.py

from tinymnist.algorithm.networks import MODEL_NAMES
from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed

speed_make_gradient = speed.make_gradient


def called(direct: bool):
    @contextlib.contextmanager
    def way():
        with (
            mock.patch.object(speed, "CPU_DIRECT_CALL", set(MODEL_NAMES) if direct else set()),
            mock.patch.object(speed, "default_micro_batch", lambda *a, **k: speed.CPU_MICRO_BATCH),
        ):
            yield

    return way


def one_graph(direct: bool):
    @contextlib.contextmanager
    def way():
        def gradient_in_chunks(config, apply):
            return speed.micro_batched(speed_make_gradient(config, apply), speed.CPU_MICRO_BATCH)

        with (
            called(direct)(),
            mock.patch.object(speed, "make_gradient", gradient_in_chunks),
            mock.patch.object(speed, "default_micro_batch", lambda *a, **k: 0),  # device_step splits nothing
        ):
            yield

    return way


WAYS = {
    "torch.compile": called(False),
    "direct": called(True),
    "one graph": one_graph(False),
    "one graph direct": one_graph(True),
}


def main():
    parser = turns_parser(__doc__, seconds=0.25)
    parser.set_defaults(models="fast,lenet,cnn", rounds=40)
    parser.add_argument("--ways", default="torch.compile,direct", help=f"of {', '.join(WAYS)}; the first the base")
    args = parser.parse_args()
    ways = {name: WAYS[name] for name in args.ways.split(",")}
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}", flush=True)
    for model in args.models.split(","):
        us = steps_in_turns(model, images, labels, ways, args.rounds, args.seconds)
        print_against(model, us, base=next(iter(ways)))


if __name__ == "__main__":
    main()
