"""What the fused Adam kernel pays for its bias corrections on the CPU.

    python research/adam_scalars.py [--model mlp3] [--rounds 7] > results/bench/adam-scalars.txt

inductor inlines a 0-d value into every loop that reads it, so a compiled Adam update that
computes 1 - beta**step inside its per-parameter expressions pays an expm1, a square root
and a division again for each 16-float vector of every parameter. algorithm/optim.py now
computes the two per-step scalars once, stacked into one tensor (a buffer inductor fills
once a step). Timed here, in turns in one process: the update as it is, against the same
update with the same outputs handed its two scalars as inputs: the floor of what the
scalars can cost. Both are torch.compile'd alone, on torch's threads; the figures include
dynamo's per-call cost.
"""

import argparse
import statistics
import time

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import make_optimizer, recipe_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp3")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = recipe_config(args.model)
    assert config.optimizer == "adam", f"{args.model}'s recipe does not use Adam"
    beta1, beta2 = config.recipe.betas or (0.9, 0.999)
    params = networks.init_params(args.model, 0)
    optimizer = make_optimizer(config)
    state = optimizer.init(params)
    grads = {name: torch.randn_like(p) for name, p in params.items()}
    lr, step_size, bias2_sqrt = torch.tensor(config.lr), torch.tensor(0.01), torch.tensor(0.03)

    def scalars_given(grads, state, params, step_size, bias2_sqrt):
        """The same update and the same outputs, its two per-step scalars handed in."""
        new, exp_avg, exp_avg_sq = {}, {}, {}
        for name, p in params.items():
            m = exp_avg[name] = state["exp_avg"][name].lerp(grads[name], 1 - beta1)
            v = exp_avg_sq[name] = (
                state["exp_avg_sq"][name].mul(beta2).addcmul(grads[name], grads[name], value=1 - beta2)
            )
            new[name] = p - step_size * (m / (v.sqrt() / bias2_sqrt + 1e-8))
        return new, {"step": state["step"] + 1, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    as_is = torch.compile(optimizer.update, fullgraph=True, dynamic=False)
    given = torch.compile(scalars_given, fullgraph=True, dynamic=False)
    calls = {
        "the update as it is": lambda: as_is(grads, state, params, lr),
        "its two scalars given": lambda: given(grads, state, params, step_size, bias2_sqrt),
    }
    for call in calls.values():
        for _ in range(10):  # compile, warm up
            call()
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(2000):
                call()
            times[name].append((time.perf_counter() - started) / 2000 * 1e6)
    params_count = sum(p.numel() for p in params.values())
    print(
        f"# {args.model}: Adam over {params_count:,} parameters, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, medians of {args.rounds} rounds of 2000 calls"
    )
    for name, values in times.items():
        print(f"{name:24} {statistics.median(values):7.1f} us a call   rounds: {', '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()
