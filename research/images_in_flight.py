"""One model's compiled gradient, per image, against how many images it takes at once.

    python research/images_in_flight.py --model cnn --batches 8,16,32,64,128,512 [--rounds 5] [--threads T]

N models in one step hold N times the images of one model's step at once. Where one model
is slower per image with more images in flight (the activations leave the cache), the
N-model step is too, whatever its convolution rule: this measures that, for one model, with
train.py's own gradient compiled as the step compiles it. Batches are timed in turns, the
fastest round of each counts (a shared machine only ever slows a round down).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms.speed import compiled

N_IMAGES = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batches", default="8,16,32,64,128,512")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=1024, help="per batch size and round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compile per batch size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N_IMAGES, 28, 28), dtype=torch.uint8, generator=g)  # (60000, 28, 28)
    labels = torch.randint(0, 10, (N_IMAGES,), generator=g)  # (60000,)
    params = networks.init_params(args.model, 0)
    gradient = compiled(make_gradient(recipe_config(args.model)))
    batches = [int(b) for b in args.batches.split(",")]
    indices = {b: torch.randint(0, N_IMAGES, (b,), generator=g) for b in batches}  # (B,) each
    for b in batches:
        gradient(params, images, labels, indices[b])  # the compile
    micros = {b: [] for b in batches}  # microseconds per image, one per round
    for _ in range(args.rounds):
        for b in batches:
            calls = max(1, args.images // b)
            started = time.perf_counter()
            for _ in range(calls):
                gradient(params, images, labels, indices[b])
            micros[b].append((time.perf_counter() - started) / (calls * b) * 1e6)
    print(f"# {args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for b, values in micros.items():
        print(f"B={b:5}  {min(values):8.0f} us/image (fastest round)  {statistics.median(values):8.0f} (median)")


if __name__ == "__main__":
    main()
