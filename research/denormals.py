"""`tinymnist train` on the CPU with denormals flushed to zero (the command's default,
transforms/denormals.py) and kept, in turns, each in a fresh process (the setting must come
before torch starts its threads), on fixed threads so that both runs compute the same steps.

    python research/denormals.py --data-dir DIR [--runs mlp,mlp3,fast,cnn:1,lenet:5] [--rounds 2]
    python research/denormals.py --data-dir DIR --profile mlp

"MODEL:E" trains E epochs instead of the recipe's. Prints each run's last line (training
seconds, compile seconds, images/s), then how the two checkpoints of a round differ: the
parameters, bit for bit, and the optimizer state (where flushing may turn a denormal into 0).
`--profile MODEL`: instead, each way in a fresh process, the step `train` runs on real digits,
timed over 200 steps after 3,000 (when denormals have built up), then profiled over 200 more
with inductor's kernels named (the ops that took most).
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CHILD = """
import sys
from tinymnist.tool import cli
if sys.argv[1] == "kept":
    cli.flush_denormals = lambda: True
sys.argv = ["tinymnist", *sys.argv[2:]]
cli.main()
"""


PROFILE_CHILD = """
import sys, time, torch
from torch.profiler import profile
from tinymnist.transforms.denormals import flush_denormals, flushed_in_every_thread
if sys.argv[1] == "flushed":
    flush_denormals()
from tinymnist import data
from tinymnist.tool.floor import cpu_steps
mnist = data.load_mnist(sys.argv[3], "cpu")
calls = cpu_steps(sys.argv[2], mnist.train_images, mnist.train_labels)
for _ in range(3000):
    next(calls)
started = time.perf_counter()
for _ in range(200):
    next(calls)
print(f"{sys.argv[1]}: every thread flushes: {flushed_in_every_thread()}; "
      f"{(time.perf_counter() - started) / 200 * 1e6:.0f} us a step after 3,000 steps")
with profile() as p:
    for _ in range(200):
        next(calls)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=70))
"""


def differing(a: dict, b: dict) -> str:
    """Elements that differ across two dicts of tensors (nested one level, as opt_state), and the largest gap."""
    pairs = []
    for key, value in a.items():
        if isinstance(value, dict):
            pairs += [(value[k], b[key][k]) for k in value]
        elif isinstance(value, torch.Tensor):
            pairs.append((value, b[key]))
    count = sum(int((x != y).sum()) for x, y in pairs)
    total = sum(x.numel() for x, _ in pairs)
    gap = max(float((x.double() - y.double()).abs().max()) for x, y in pairs)
    return f"{count:,} of {total:,} differ, largest difference {gap:.3g}"


def denormal_census(opt_state: dict) -> str:
    """Where the denormals sit in each 2-d state tensor (a Linear weight's (out, in)): how many,
    and how many of its rows (units) hold nothing else but zeros."""
    found = []
    for key, tensors in opt_state.items():
        for name, x in tensors.items() if isinstance(tensors, dict) else ():
            denormal = (x != 0) & (x.abs() < torch.finfo(x.dtype).tiny)
            if x.dim() == 2 and denormal.any():
                whole_rows = int((denormal.any(1) & (denormal | (x == 0)).all(1)).sum())
                found.append(f"{key}[{name}] {int(denormal.sum()):,} of {x.numel():,} ({whole_rows} whole rows)")
    return "denormals in " + ("; ".join(found) or "no weight's state")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="mlp,mlp3,fast,cnn:1,lenet:5")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--profile", help="a model: profile its step both ways instead")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads", flush=True)
    if args.profile:
        for way in ("kept", "flushed"):
            child = [sys.executable, "-c", PROFILE_CHILD, way, args.profile, args.data_dir]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE": "1"}
            print(subprocess.run(child, capture_output=True, text=True, env=env).stdout, flush=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        for run in args.runs.split(","):
            model, _, epochs = run.partition(":")
            for r in range(args.rounds):
                ways = ["flushed", "kept"] if r % 2 == 0 else ["kept", "flushed"]
                saved = {}
                for way in ways:
                    saved[way] = Path(scratch) / f"{model}-{way}.pt"
                    train = ["train", "--model", model, "--device", "cpu", "--data-dir", args.data_dir, "--no-download"]
                    train += ["--threads", str(args.threads), "--save-model", str(saved[way])]
                    train += ["--epochs", epochs] if epochs else []
                    out = subprocess.run([sys.executable, "-c", CHILD, way, *train], capture_output=True, text=True)
                    lines = out.stdout.strip().splitlines() or [out.stderr.strip()]
                    print(f"{model} | round {r + 1} | {way} | {lines[-1]}", flush=True)
                a, b = (torch.load(saved[w], weights_only=True) for w in ("flushed", "kept"))
                print(f"{model} | round {r + 1} | parameters: {differing(a['params'], b['params'])}", flush=True)
                print(f"{model} | round {r + 1} | optimizer state: {differing(a['opt_state'], b['opt_state'])}")
                print(f"{model} | round {r + 1} | kept: {denormal_census(b['opt_state'])}", flush=True)


if __name__ == "__main__":
    main()
