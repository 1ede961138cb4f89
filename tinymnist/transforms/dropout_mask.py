"""A speed trick for the CPU: dropout's mask drawn by a kernel inductor generates, not by an eager call.

Dropout keeps each value with probability q = 1 - p. Traced under torch.func's grad or vmap, as the
step is, F.dropout's mask becomes `aten.bernoulli.p(x, q)` in the graph inductor compiles, and on the
CPU inductor keeps that as a call of torch's eager kernel: about 2.3 ms a call in cnn's step, twice a
step. The same draw, each value 1 with probability q, is `rand(shape) > p`, the mask inductor itself
makes for a plain compiled F.dropout: a counter-based random number kernel (Philox) fused with the
multiply that applies the mask. `rewrite` makes that change in the graph before inductor's own pass
turns `rand` into its kernel (inductor's joint-graph pre-pass); the networks keep F.dropout, and
eager runs are unchanged.

What changes is which masks a compiled CPU run draws: inductor's, as it already does on CUDA, not
eager's, for the same seed. They come from torch's global generator all the same (inductor takes
its seeds from it on each call), so a checkpoint's generator state still resumes a run exactly.
With inductor's `fallback_random` set (eager's random numbers wanted) the pass stands aside. cnn's
compiled CPU step took 0.93x the time (rounds 0.89-1.03x) on a 2-core Intel Xeon
(research/cnn_dropout_mask.py, BENCHMARKS.md "What was tried on the CPU").
"""

from __future__ import annotations

import functools

import torch

from tinymnist.transforms import graph_splice
from tinymnist.transforms.graph_splice import spliced

aten = torch.ops.aten


def uniform_mask(like: torch.Tensor, keep: float) -> torch.Tensor:
    """Each value 1 with probability `keep`, else 0, in like's shape, dtype and device: bernoulli.p's draw,
    written as inductor writes a compiled F.dropout's mask (float32 draws, so no rounding biases `keep`)."""
    draws = torch.rand(like.shape, dtype=torch.float32, device=like.device)  # uniform on [0, 1)
    return (draws > 1 - keep).to(like.dtype)


def rewritable(node: torch.fx.Node) -> bool:
    """A CPU bernoulli.p of a floating tensor with p given and no generator of its own."""
    if node.target is not aten.bernoulli.p or len(node.args) != 2 or node.kwargs:
        return False  # p as a keyword, or a generator: left as it is
    like = node.args[0]
    value = like.meta.get("val") if isinstance(like, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype.is_floating_point


def rewrite(graph: torch.fx.Graph) -> None:
    """Each rewritable bernoulli.p of `graph` becomes uniform_mask, unless inductor is asked for eager's
    random numbers (its fallback_random), which the rewrite would not give."""
    import torch._inductor.config

    if torch._inductor.config.fallback_random:
        return
    for node in list(graph.nodes):
        if rewritable(node):
            replace(graph, node)


def replace(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """uniform_mask, traced on the node's fake value, in the node's place."""
    from torch._inductor.decomposition import select_decomp_table

    like, keep = node.args
    # in the ops inductor lowers: its decompositions ran before this pass
    mask = spliced(graph, node, functools.partial(uniform_mask, keep=keep), [like], select_decomp_table())
    node.replace_all_uses_with(mask)
    graph.erase_node(node)


@functools.cache
def inductor_pass():
    """`rewrite` as inductor's joint-graph pre-pass (it runs before inductor turns `rand` into its
    random number kernel). Built on first use: importing inductor takes about 2 s."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class DropoutMask(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph)

        def uuid(self) -> bytes:  # inductor's cache key: the text of this file and of the splice it uses
            return get_hash_for_files((__file__, graph_splice.__file__))

    return DropoutMask()
