"""`tinymnist train` on the CPU with mlp's and mlp3's step called directly (the default) and through
torch.compile (speed.CPU_DIRECT_CALL emptied), in turns, each in a fresh process, so that the
compile is paid as a user pays it (inductor's caches warm after the first round of each).

    python research/direct_call_train.py --models mlp3,mlp --rounds 4 --data-dir DIR

Prints each run's last line: training seconds, compile seconds, images/s.
"""

import argparse
import subprocess
import sys

CHILD = """
import sys
from tinymnist.transforms import speed
from tinymnist.tool.entry import main
if sys.argv[1] == "torch.compile":
    speed.CPU_DIRECT_CALL.clear()
sys.argv = ["tinymnist", *sys.argv[2:]]
main()
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp3,mlp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    for model in args.models.split(","):
        for r in range(args.rounds):
            ways = ["direct", "torch.compile"] if r % 2 == 0 else ["torch.compile", "direct"]
            for way in ways:
                train = ["train", "--model", model, "--device", "cpu", "--data-dir", args.data_dir, "--no-download"]
                out = subprocess.run([sys.executable, "-c", CHILD, way, *train], capture_output=True, text=True)
                last = (out.stdout.strip().splitlines() or [out.stderr.strip()])[-1]
                print(f"{model} | round {r + 1} | {way} | {last}", flush=True)


if __name__ == "__main__":
    main()
