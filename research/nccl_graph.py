"""Can the data-parallel step, its all-reduce inside, be replayed as a CUDA graph? One process, NCCL.

    python research/nccl_graph.py [--model lenet] [--batch 64] [--steps 300]

Under torchrun, tinymnist trains data-parallel without CUDA graphs (tool/torchrun.py:
"an NCCL collective inside one is untested"). This starts a one-process NCCL group on
127.0.0.1 itself and tries the two ways a graph could hold the all-reduced step
(transforms/all_reduce.py):

    graphed      transforms/cuda_graph.GraphedStep, tinymnist's own capture
    inductor     torch.compile(mode="reduce-overhead") with inductor's cudagraph_or_error
                 on, which raises instead of quietly running without graphs

and times each against the compiled step without a graph (what torchrun runs today) and
the single-process graphed step (what `train` runs). The parameters after `--steps`
steps are compared with the ungraphed step's: lenet has no dropout, so all ways compute
the same arithmetic. Random digits: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from tinymnist.algorithm.config import make_optimizer, recipe_config
from tinymnist.algorithm.train import initial_state, make_gradient, make_step
from tinymnist.algorithm.trees import tree_map
from tinymnist.transforms.all_reduce import all_reduced
from tinymnist.transforms.cuda_graph import GraphedStep
from tinymnist.transforms.speed import compiled


def train(step, state, images, labels, batches, lr) -> tuple[float, dict]:
    """Seconds per step over `batches` (after 5 untimed ones), and the final parameters."""
    params, opt_state = tree_map(torch.clone, state.params), tree_map(torch.clone, state.opt_state)
    for batch_idx in batches[:5]:
        params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, lr)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for batch_idx in batches[5:]:
        params, opt_state, _ = step(params, opt_state, images, labels, batch_idx, lr)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / (len(batches) - 5), tree_map(torch.clone, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    device = torch.device("cuda:0")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    config = recipe_config(args.model, batch_size=args.batch)
    optimizer = make_optimizer(config)
    state = initial_state(config, optimizer, device)
    images = torch.randint(0, 256, (60_000, 28, 28), dtype=torch.uint8, device=device)  # (N, 28, 28)
    labels = torch.randint(0, 10, (60_000,), device=device)  # (N,)
    batches = torch.randint(0, 60_000, (args.steps + 5, args.batch), device=device)  # (steps, B)
    lr = torch.tensor(config.lr, device=device)
    one_process = make_step(make_gradient(config), optimizer)
    parallel = make_step(all_reduced(make_gradient(config), 0, 1), optimizer)

    ways = {
        "all-reduced, compiled, no graph (torchrun today)": lambda: compiled(parallel),
        "all-reduced, GraphedStep": lambda: GraphedStep(parallel, compile=True),
        "all-reduced, inductor reduce-overhead, cudagraph_or_error": lambda: torch.compile(
            parallel, mode="reduce-overhead", fullgraph=True, dynamic=False
        ),
        "one process, GraphedStep (train today)": lambda: GraphedStep(one_process, compile=True),
    }
    print(
        f"# {args.model}, batch {args.batch}, {args.steps} timed steps, {torch.cuda.get_device_name(device)}, "
        f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
    )
    reference = None
    for name, build in ways.items():
        torch._dynamo.reset()
        try:
            with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
                seconds, params = train(build(), state, images, labels, batches, lr)
        except Exception as error:  # the finding is which ways fail, and how
            print(f"{name:58}  FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        reference = reference or params
        differs = max((params[k] - reference[k]).abs().max().item() for k in params)
        print(f"{name:58}  {seconds * 1e6:8.1f} us a step   max |param - first way's| {differs:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
