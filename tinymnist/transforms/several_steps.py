"""A transform, CPU: several steps in one compiled call, for steps too small to pay a call each.

Every call of a compiled step pays a fixed cost before any arithmetic: dynamo's guard
checks and the compiled graph's wrapper, tens of microseconds. mlp3's step of 15 images
does a few microseconds of products, so that cost is most of its step. `SeveralSteps`
runs up to k consecutive steps per call, through torch's scan operator: one graph whose
body is the step, compiled once, that loops inside.

    several(params, opt_state, images, labels, batch_idx, lr) -> (params, opt_state, loss)
        batch_idx: (n, B)  lr: (n,)  n <= k;  loss: the n steps' losses, summed

The loop (algorithm/train.py's fit) calls it with the steps up to its next log line,
evaluation or epoch end, so it still reads the device only at those. A call of exactly
k steps runs the scan; a shorter one (the end of an epoch) runs the compiled single step
n times, as a scan of another length would compile again. Either way the parameters are
those of n calls of the compiled single step, bit for bit on the CPU (tested): scan's
body is the step's own graph. The loss is summed in step order; where a log interval
takes several calls, the loop adds their sums, and the logged loss may differ in the last bits.

Worth about 10% for mlp and mlp3 on 2 cores, for seconds more compile: `train
--steps-per-call K` asks for it, and the default is one step per call (BENCHMARKS.md,
"Several steps per call"; research/several_steps.py).
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
    """Up to k steps per call: k in one compiled scan, fewer one compiled step at a time.

    Its first call compiles both, so that both compiles fall in the call the loop keeps off
    its clock: the path that call does not take runs once and is thrown away, with torch's
    random state put back (dropout draws from it)."""

    def __init__(self, one: Step, several: Step, k: int):
        self.one, self.several, self.k = one, several, k  # one: compiled(step); several: compiled(scanned(step))
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
