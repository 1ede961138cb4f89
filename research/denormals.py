"""`tinymnist train` on the CPU with denormals flushed to zero (the command's default,
transforms/denormals.py) and kept, in turns, each in a fresh process (the setting must come
before torch starts its threads), on fixed threads so that both runs compute the same steps.

    python research/denormals.py --data-dir DIR [--runs mlp,mlp3,fast,cnn:1,lenet:5] [--rounds 2]

"MODEL:E" trains E epochs instead of the recipe's. Prints each run's last line (training
seconds, compile seconds, images/s), then how the two checkpoints of a round differ: the
parameters, bit for bit, and the optimizer state (where flushing may turn a denormal into 0).
"""

import argparse
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="mlp,mlp3,fast,cnn:1,lenet:5")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads", flush=True)
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


if __name__ == "__main__":
    main()
