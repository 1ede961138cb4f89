"""The one helper for nested dicts of tensors (params, optimizer state, RNG states).

Everything the training loop carries is such a tree. Moving it to a device, cloning
it, stacking N of them for vmap: each is `tree_map` with a different leaf function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tree = dict[str, Any]  # leaves are tensors; inner nodes are dicts


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:
    """A new tree of `fn(leaf, *matching leaves of rest)`, keys in `tree`'s order.

    The order matters: torch.compile guards on a dict's key order, so a state whose
    keys came back reordered would recompile the step."""
    return {
        k: tree_map(fn, v, *(r[k] for r in rest)) if isinstance(v, dict) else fn(v, *(r[k] for r in rest))
        for k, v in tree.items()
    }


def copy_into(target: Tree, source: Tree) -> None:
    """Write `source`'s values into `target`'s tensors, which keep their addresses."""
    tree_map(lambda t, s: t.copy_(s), target, source)
