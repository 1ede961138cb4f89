"""A transform, CPU: several steps in one compiled call, for steps too small to pay a call each.

Each call of a compiled step pays for its Python side: the arguments taken apart and the results
built (direct_call.py), inductor's wrapper allocating every buffer and checking every input's
size, the loop between calls. For mlp3 that is most of a step. `SeveralSteps` runs up to k steps
per call as one graph: the step unrolled k times, the parameters each step returns fed to the next,
so that the Python side is paid once per k steps. In `tinymnist bench --floor` on 2 cores of an AMD
EPYC, 10 unrolled steps per call took 0.48x the time per step of one per call for mlp3, 0.63x for mlp
(BENCHMARKS.md "Several steps per call"). The graph is k steps long, so its first compile is too
(33-49 s for mlp and mlp3 at k = 10; inductor's cache keeps it for later runs), so it is opt-in,
`train --steps-per-call K`. Torch's scan operator keeps the graph one step long and compiled in
9 s, but ran only 1.03-1.15x as fast as one step per call on the same machine (unrolled: 1.34-2.01x).
speed.device_step has inductor's C++ wrapper call the k-step graph's kernels: 1.33x (mlp) and 2.20x
(mlp3) the speed of one step per call, against 1.15x and 1.83x with its Python wrapper.

    several(params, opt_state, images, labels, batch_idx, lr) -> (params, opt_state, loss)
        batch_idx: (n, B)  lr: (n,)  n <= k;  loss: the n steps' losses, summed

The loop calls it with the steps up to its next log line, evaluation or epoch end. Exactly k
steps run the k-step graph; fewer run the compiled single step n times (another length would
compile again). Either way the parameters equal n single steps' bit for bit on the CPU; a logged
loss summed over several calls may differ in the last bits.
"""

from __future__ import annotations

import torch

from tinymnist.algorithm.train import Step


def unrolled(step: Step, k: int) -> Step:
    """`step` run once per row of (k, B) batch indices and (k,) rates, traced as one graph; the summed loss."""

    def steps(params, opt_state, images, labels, batch_idx, lr):  # batch_idx: (k, B), lr: (k,)
        total = torch.zeros((), device=images.device)
        for i in range(k):
            params, opt_state, loss = step(params, opt_state, images, labels, batch_idx[i], lr[i])
            total = total + loss
        return params, opt_state, total

    return steps


class SeveralSteps:
    """Up to k steps per call: k in one compiled graph, fewer one compiled step at a time. The first call,
    which the loop keeps off its clock, compiles both: the path it does not take runs once and is
    thrown away, with torch's random state (dropout's) put back."""

    def __init__(self, one: Step, several: Step, k: int):
        self.one, self.several, self.k = one, several, k  # compiled: step and unrolled(step, k)
        self.compiled = False

    def __call__(self, params, opt_state, images, labels, batch_idx, lr):  # batch_idx: (n, B), lr: (n,)
        if not self.compiled:
            self.compile_the_other_path(params, opt_state, images, labels, batch_idx, lr)
        if len(batch_idx) == self.k:
            return self.several(params, opt_state, images, labels, batch_idx, lr)
        fewer = unrolled(self.one, len(batch_idx))  # the compiled single step, called n times from Python
        return fewer(params, opt_state, images, labels, batch_idx, lr)

    def compile_the_other_path(self, params, opt_state, images, labels, batch_idx, lr) -> None:
        self.compiled = True
        rng = torch.get_rng_state()
        if len(batch_idx) == self.k:
            self.one(params, opt_state, images, labels, batch_idx[0], lr[0])
        else:
            rows = [0] * self.k  # the k-step graph's shape: k rows (the first, repeated)
            self.several(params, opt_state, images, labels, batch_idx[rows], lr[rows])
        torch.set_rng_state(rng)
