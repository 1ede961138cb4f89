"""A transform, CPU: several steps in one compiled call, for steps too small to pay a call each.

Each call of a compiled step pays tens of microseconds of guards and wrapper, most of mlp3's
step. `SeveralSteps` runs up to k steps per call through torch's scan operator, one graph
whose body is the step. Worth about 10% for mlp and mlp3 on 2 cores, for seconds more compile,
so it is opt-in, `train --steps-per-call K` (BENCHMARKS.md "Several steps per call";
research/several_steps.py). Since mlp's and mlp3's single step is called without dynamo's entry
(direct_call.py), 10 per call still took 0.90x (mlp) and 0.84x (mlp3) the time of one per call
(tinymnist bench --floor, BENCHMARKS.md).

    several(params, opt_state, images, labels, batch_idx, lr) -> (params, opt_state, loss)
        batch_idx: (n, B)  lr: (n,)  n <= k;  loss: the n steps' losses, summed

The loop calls it with the steps up to its next log line, evaluation or epoch end. Exactly k
steps run the scan; fewer run the compiled single step n times (another length would compile
again). Either way the parameters equal n single steps' bit for bit on the CPU; a logged loss
summed over several calls may differ in the last bits.
"""

from __future__ import annotations

import torch
from torch._higher_order_ops.scan import scan  # torch's scan operator (no public name in torch 2.13)

from tinymnist.algorithm.train import Step


def scanned(step: Step) -> Step:
    """`step` run once per row of (n, B) batch indices and (n,) rates, in one scan; the summed loss."""

    def steps(params, opt_state, images, labels, batch_idx, lr):  # batch_idx: (n, B), lr: (n,)
        def body(carry, row):
            (params, opt_state, total), (idx, rate) = carry, row
            params, opt_state, loss = step(params, opt_state, images, labels, idx, rate)
            return (params, opt_state, total + loss), loss

        zero = torch.zeros((), device=images.device)
        (params, opt_state, total), _ = scan(body, (params, opt_state, zero), (batch_idx, lr))
        return params, opt_state, total

    return steps


class SeveralSteps:
    """Up to k steps per call: k in one compiled scan, fewer one compiled step at a time. The first call,
    which the loop keeps off its clock, compiles both: the path it does not take runs once and is
    thrown away, with torch's random state (dropout's) put back."""

    def __init__(self, one: Step, several: Step, k: int):
        self.one, self.several, self.k = one, several, k  # compiled(step[, direct]), compiled(scanned(step))
        self.compiled = False

    def __call__(self, params, opt_state, images, labels, batch_idx, lr):  # batch_idx: (n, B), lr: (n,)
        if not self.compiled:
            self.compile_the_other_path(params, opt_state, images, labels, batch_idx, lr)
        if len(batch_idx) == self.k:
            return self.several(params, opt_state, images, labels, batch_idx, lr)
        total = 0.0
        for idx, rate in zip(batch_idx, lr, strict=True):
            params, opt_state, loss = self.one(params, opt_state, images, labels, idx, rate)
            total = total + loss
        return params, opt_state, total

    def compile_the_other_path(self, params, opt_state, images, labels, batch_idx, lr) -> None:
        self.compiled = True
        rng = torch.get_rng_state()
        if len(batch_idx) == self.k:
            self.one(params, opt_state, images, labels, batch_idx[0], lr[0])
        else:
            rows = [0] * self.k  # the scan's shape: k rows (the first, repeated)
            self.several(params, opt_state, images, labels, batch_idx[rows], lr[rows])
        torch.set_rng_state(rng)
