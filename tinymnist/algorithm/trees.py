"""`tree_map`, the one helper for the nested tensor dicts the loop carries (params, optimizer state, RNG)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tree = dict[str, Any]  # leaves are tensors; inner nodes are dicts


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:
    """A new tree of `fn(leaf, *matching leaves of rest)`, keys in `tree`'s order
    (torch.compile guards on a dict's key order: reordered keys would recompile the step)."""
    return {
        k: tree_map(fn, v, *(r[k] for r in rest)) if isinstance(v, dict) else fn(v, *(r[k] for r in rest))
        for k, v in tree.items()
    }


def copy_into(target: Tree, source: Tree) -> None:
    """Write `source`'s values into `target`'s tensors, which keep their addresses."""
    tree_map(lambda t, s: t.copy_(s), target, source)
