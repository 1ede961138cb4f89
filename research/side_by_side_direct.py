"""N models side by side (fast, lenet on the CPU) with their compiled pieces called directly, as `train` runs
them since 2026-12-07, against the same pieces through torch.compile, timed in turns in one process.

    torch.compile  speed.device_step with no network in speed.CPU_DIRECT_CALL: each model's gradient through
                   torch.compile (C++ wrapper, on a lane of one thread), the N-model update too
    direct         the same graphs called directly (transforms/direct_call.py)

    python research/side_by_side_direct.py --data-dir DIR [--models fast,lenet] [--seeds 8] [--rounds 20]
        [--seconds 0.5]
"""

from __future__ import annotations

import itertools
import statistics
from unittest import mock

import torch
from in_turns import print_against, turns_parser  # research/in_turns.py

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.networks import MODEL_NAMES
from tinymnist.algorithm.train import initial_state
from tinymnist.tool.bench import bench_data
from tinymnist.tool.floor import window_us
from tinymnist.transforms import speed

CPU = torch.device("cpu")


def n_model_steps(model: str, n: int, images, labels, direct: bool):
    """Yield the steps (one a call) of the N-model step train builds for `model`, each way built apart."""
    config = recipe_config(model, compile=True, seeds=n)
    optimizer = make_optimizer(config)
    with mock.patch.object(speed, "CPU_DIRECT_CALL", set(MODEL_NAMES) if direct else set()):
        step = speed.device_step(config, optimizer, CPU, adaptive_threads=False)
    state = initial_state(config, optimizer, CPU)
    params, opt_state = state.params, state.opt_state
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, len(images), (8, n, config.batch_size), generator=g)  # 8 calls' (N, B) rows
    lr = torch.full((n,), config.lr)
    for batch_idx in itertools.cycle(batches):
        params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, lr)
        yield 1


def main():
    parser = turns_parser(__doc__, seconds=0.5)
    parser.set_defaults(rounds=20)
    parser.add_argument("--seeds", type=int, default=8, help="models in the step")
    args = parser.parse_args()
    images, labels, source = bench_data(args.data_dir, CPU)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; data: {source}; {args.seeds} models", flush=True)
    for model in args.models.split(","):
        ways = ("torch.compile", "direct")
        loops = {way: n_model_steps(model, args.seeds, images, labels, way == "direct") for way in ways}
        for loop in loops.values():
            for _ in range(3):  # the compile, then two more
                next(loop)
        us = {way: [] for way in loops}
        for round_ in range(args.rounds):
            for way in loops if round_ % 2 == 0 else reversed(loops):
                us[way].append(window_us(loops[way], args.seconds))
        print_against(model, us, base="torch.compile")
        print(f"{model}: medians {', '.join(f'{w} {statistics.median(t):,.0f} us' for w, t in us.items())}")


if __name__ == "__main__":
    main()
