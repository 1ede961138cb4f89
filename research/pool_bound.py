"""How close could `fast`'s and `lenet`'s CPU steps come to their floor with a perfect max-pool?

The gap of these two steps to their floor (`tinymnist bench --floor`) lies mostly outside their
products, in the kernels inductor compiles around max-pooling. A bound on what any pool kernel could
win: the same step with every pool swapped for its window's top-left corner block,

    corner(x) = x[:, :, :H/k, :W/k]    (N, C, H/k, W/k), the pool's shape

whose forward reads the pool's output size and whose backward writes the full-resolution gradient
(zeros around the block) in elementwise code: the gradient writes any pool backward must make, with
no maximum found and no index kept. Its values are wrong; its time is about the least a pool costs.
This times train's step, the corner step, and the floor's products and optimizer traffic (tool/floor.py,
whose faster way, whole batch or micro-batches, is taken by median as in `bench --floor`), in turns,
`--rounds` rounds; each step's median and the median (and range) of its rounds' ratios to the floor.

    python research/pool_bound.py --data-dir DIR [--models fast,lenet] [--rounds 5] [--seconds 0.5]
"""

from __future__ import annotations

import contextlib
import os
import statistics
from unittest import mock

import torch
from in_turns import turns_parser  # research/in_turns.py

from tinymnist.algorithm import cpu_pool
from tinymnist.algorithm.config import recipe_config
from tinymnist.tool import floor
from tinymnist.tool.bench import bench_data
from tinymnist.transforms import speed
from tinymnist.transforms.denormals import flush_denormals


def corner(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H/k, W/k): the top-left block, the shape of a k x k pool's output."""
    height, width = x.shape[-2:]
    return x[:, :, : height // kernel, : width // kernel]


def floor_us(parts: dict) -> dict[str, float]:
    """One measurement of each way of the floor's products (whole batch, micro-batches: tool/floor.py's
    cheapest_total), each with the optimizer's traffic added."""
    times = {way: floor.cheapest_total({n: t.microseconds() for n, t in timed.items()}) for way, timed in parts.items()}
    optimizer = times.pop("optimizer")
    return {way: us + optimizer for way, us in times.items()}


def main() -> None:
    args = turns_parser(__doc__, seconds=0.5).parse_args()
    flush_denormals()  # as `train` runs
    images, labels, source = bench_data(args.data_dir, torch.device("cpu"))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data: {source}; load average {load}")
    ways = {"train's": contextlib.nullcontext(), "corner": mock.patch.object(cpu_pool, "first_max_pool2d", corner)}
    for model in args.models.split(","):
        loops = {}
        for name, way in ways.items():
            with way:
                loops[name] = floor.cpu_steps(model, images, labels)
                for _ in range(3):  # the compile, then two more
                    next(loops[name])
        parts = floor.floor_parts(model, recipe_config(model).batch_size, speed.CPU_MICRO_BATCH)  # as bench --floor
        samples, floors = {name: [] for name in ways}, {way: [] for way in parts if way != "optimizer"}
        for round_ in range(args.rounds):
            for name in ways if round_ % 2 == 0 else reversed(ways):
                with ways[name]:
                    samples[name].append(floor.window_us(loops[name], args.seconds))
            for way, us in floor_us(parts).items():
                floors[way].append(us)
        way = min(floors, key=lambda w: statistics.median(floors[w]))  # as bench --floor: the faster way by median
        print(f"{model}: floor: {statistics.median(floors[way]):,.0f} us ({way})", flush=True)
        for name, us in samples.items():
            ratios = [step / f for step, f in zip(us, floors[way], strict=True)]
            print(
                f"{model}: {name}: {statistics.median(us):,.0f} us a step, {statistics.median(ratios):.2f}x the floor "
                f"({min(ratios):.2f}-{max(ratios):.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
