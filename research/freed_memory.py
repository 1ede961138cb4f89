"""Does a step get faster when malloc keeps freed memory for reuse (transforms/freed_memory.py)?

Each measurement is a fresh process, since malloc's thresholds cannot be put back as they were:
one with glibc's defaults, one that calls `reuse_freed_memory()` first, in turns, `--rounds`
rounds. A process builds `train`'s compiled CPU step (one model: tool/floor.cpu_steps, fixed
threads; "cnn x8": the step of `train --seeds 8`, 8 models one at a time), runs 3 steps, then
times steps for `--seconds`, and reports microseconds a step, the minor page faults a step (a
fault is a page touched for the first time: what reuse saves) and its peak RSS. Denormals are
flushed, as `train` does. Prints each run and, per step, the medians and the median of the rounds'
time ratios (reuse over default).

    python research/freed_memory.py --data-dir DIR [--steps mlp,mlp3,cnn,lenet,fast,cnn-x8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CHILD = """
import dataclasses, json, resource, sys, time, torch
from tinymnist.transforms.freed_memory import reuse_freed_memory
reused = reuse_freed_memory() if sys.argv[2] == "reuse" else False
from tinymnist.algorithm.config import recipe_config
from tinymnist.tool import floor
from tinymnist.tool.bench import bench_data, our_steps
from tinymnist.transforms.denormals import flush_denormals
flush_denormals()
name, seconds = sys.argv[1], float(sys.argv[4])
images, labels, _ = bench_data(sys.argv[3], torch.device("cpu"))
if name.endswith("-x8"):
    config = dataclasses.replace(recipe_config(name.removesuffix("-x8")), seeds=8)
    steps = (1 for _ in our_steps(config, images, labels, torch.device("cpu"), True, adaptive_threads=False))
else:
    steps = floor.cpu_steps(name, images, labels)
for _ in range(3):
    next(steps)
faults, started, done = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter(), 0
while time.perf_counter() - started < seconds:
    done += next(steps)
elapsed = time.perf_counter() - started
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"us": elapsed / done * 1e6, "faults": faults / done, "rss_mb": rss_mb, "reused": reused}))
"""

MODES = ("default", "reuse")


def run(name: str, mode: str, data_dir: str, seconds: float) -> dict:
    command = [sys.executable, "-c", CHILD, name, mode, data_dir, str(seconds)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", default="mlp,mlp3,cnn,lenet,fast,cnn-x8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; children's peak RSS so far: "
        f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} KiB",
        flush=True,
    )
    for name in args.steps.split(","):
        runs = {mode: [] for mode in MODES}
        for i in range(args.rounds):
            for mode in MODES if i % 2 == 0 else reversed(MODES):
                runs[mode].append(run(name, mode, args.data_dir, args.seconds))
                print(f"{name} {mode}: {json.dumps(runs[mode][-1])}", flush=True)
        ratios = [r["us"] / d["us"] for d, r in zip(runs["default"], runs["reuse"], strict=True)]
        for mode in MODES:
            median = {key: statistics.median(r[key] for r in runs[mode]) for key in ("us", "faults", "rss_mb")}
            print(
                f"{name}: {mode}: {median['us']:,.0f} us a step, {median['faults']:,.0f} page faults a step, "
                f"peak RSS {median['rss_mb']:,.0f} MB",
                flush=True,
            )
        print(
            f"{name}: reuse {statistics.median(ratios):.3f}x the default's time "
            f"(rounds {min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
