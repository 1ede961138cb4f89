"""What the inductor passes (first_conv.py, dropout_mask.py) share: a function spliced into a graph."""

from __future__ import annotations

import torch
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx


def spliced(graph: torch.fx.Graph, node: torch.fx.Node, fn, inputs: list[torch.fx.Node], decompositions=None):
    """`fn` traced with make_fx on the fake values of `inputs` (nodes of `graph`), in `decompositions`' ops,
    and copied into `graph` before `node`, reading `inputs`: what `fn` returns, as nodes of `graph`."""
    values = [n.meta["val"] for n in inputs]
    with detect_fake_mode(values):  # the fake values inductor traced the graph with
        traced = make_fx(fn, decompositions)(*values)
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    with graph.inserting_before(node):
        return graph.graph_copy(traced.graph, dict(zip(placeholders, inputs, strict=True)))
