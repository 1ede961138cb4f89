"""A transform, CPU: the compiled graph called straight, without dynamo's entry on every call.

A call of a torch.compile'd function goes through dynamo first: its frame hook, its guards on every
argument, and the code that takes the argument dicts apart and builds the result's. For a step as small as
mlp3's (29 tensors in, a few hundred µs) that counts: called directly, the same graph took 0.78x the time,
mlp's 0.86x (research/direct_call.py); lenet's step in chunks of 256, a compiled gradient per chunk (its
default until 2026-12-07, and fast's before polyphase.py), 0.956-0.977x in medians of 40 paired rounds
(fast's 0.955-0.966x), a few percent at most (research/one_graph_micro.py; BENCHMARKS.md "How far each step
is from its floor").
`called_directly(fn, options)` does the compile once by hand:

    trace:    make_fx(fn) on fake tensors      one aten graph of the whole step, backward included
    compile:  inductor's compile_fx(graph)     the same kernels torch.compile builds from it (through
                                               first_conv.compile_with_choices, as speed.compiled's)
    call:     flatten the arguments, call what compile_fx returns (the compiled graph in
              AOTAutograd's runtime wrapper), rebuild the outputs' dicts

Its own guard is the key of what a compiled graph is built for: each argument's shape, strides,
dtype, device and requires_grad, and the thread count (inductor's CPU kernels are generated for
the count they are compiled under). A new key traces and compiles again, and the graph is kept; the loop's
arguments never change, so that is once per run and thread count. The functions it is given are
pure: dicts, tuples and lists of tensors that need no gradient in, the same out, with no Python
branch on a tensor's value (make_fx traces one path, where dynamo would break the graph). Calls from
several threads share a key's graph once it is compiled (models_on_cores' first call compiles every
key its lanes meet, on the caller's thread); a new key is traced and compiled under first_conv's
lock, one at a time, since the trace's "compiling" flag and torch.fx's tracer state are global.
"""

from __future__ import annotations

import torch

from tinymnist.transforms import first_conv


class Layout:
    """Where a tree of dicts, tuples and lists keeps its leaves: flattened and rebuilt by a walk made
    for these three kinds only, cheaper on every call than torch's generic pytree."""

    def __init__(self, tree):
        self.structure = structure_of(tree)  # None for a leaf; (type, keys or length, substructures) for a node

    def flatten(self, tree) -> list:
        leaves = []
        put_leaves(self.structure, tree, leaves)
        return leaves

    def rebuild(self, leaves):
        return build(self.structure, iter(leaves))


def structure_of(tree):
    if isinstance(tree, dict):
        return dict, tuple(tree), tuple(structure_of(v) for v in tree.values())
    if isinstance(tree, tuple | list):
        return type(tree), len(tree), tuple(structure_of(v) for v in tree)
    return None


def put_leaves(structure, tree, leaves: list) -> None:
    if structure is None:
        leaves.append(tree)
        return
    kind, keys, subs = structure
    if kind is dict:
        if len(tree) != len(keys):
            raise ValueError(f"a dict of {len(tree)} entries where the compiled graph takes {len(keys)}")
        values = [tree[k] for k in keys]
    else:
        if len(tree) != keys:
            raise ValueError(f"a sequence of {len(tree)} items where the compiled graph takes {keys}")
        values = tree
    for sub, value in zip(subs, values, strict=True):
        if sub is None:
            leaves.append(value)
        else:
            put_leaves(sub, value, leaves)


def build(structure, leaves):
    if structure is None:
        return next(leaves)
    kind, keys, subs = structure
    if kind is dict:
        return {k: build(sub, leaves) for k, sub in zip(keys, subs, strict=True)}
    return kind(build(sub, leaves) for sub in subs)


def called_directly(fn, options: dict):
    """`fn` compiled by inductor with `options` once per key (see above), then called without dynamo."""
    graphs = {}  # key -> (compiled graph, the outputs' layout)
    layout = None

    def call(*args):
        nonlocal layout
        if layout is None:
            layout = Layout(args)
            if not all(isinstance(x, torch.Tensor) for x in layout.flatten(args)):
                raise TypeError("called_directly takes tensors, in dicts, tuples and lists, only")
        flat = layout.flatten(args)
        key = (torch.get_num_threads(), *[(x.shape, x.stride(), x.dtype, x.device, x.requires_grad) for x in flat])
        if key not in graphs:
            if any(x.requires_grad for x in flat):  # the compiled graph would drop autograd's history
                raise TypeError("called_directly takes tensors that need no gradient")
            with first_conv.COMPILING:  # one trace and compile at a time: their flags and tracer state are global
                if key not in graphs:
                    graphs[key] = compiled_graph(fn, layout, flat, options)
        graph, out_layout = graphs[key]
        return out_layout.rebuild(graph(*flat))

    return call


def compiled_graph(fn, layout: Layout, flat: list, options: dict):
    """`fn` over flat leaves, traced on fake tensors (no arithmetic, no random numbers drawn), compiled.
    Imported here: inductor takes most of a second to import, and `tinymnist info` never needs it."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # Fixed sizes, as torch.compile(dynamic=False); the shape env and the tracing context are what
    # inductor's caches ask for (without them the compile was never cached: 3 s again in every run).
    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)
    out_layout = None

    def flat_fn(*leaves):
        nonlocal out_layout
        out = fn(*layout.rebuild(leaves))
        out_layout = Layout(out)
        return tuple(out_layout.flatten(out))

    fakes = [fake_mode.from_tensor(x) for x in flat]
    # A private torch (2.13) context that only sets the flag is_compiling() reads, as torch.compile sets it:
    # cpu_pool.max_pool2d asks it.
    with torch.compiler._compile_session_context(), fake_mode:
        graph = make_fx(flat_fn)(*fakes)
    # The key above guards every argument's shape and strides, so the graph's own checks of them on every
    # call are left out (unless `options` asks for them): mlp3's step 0.90-0.93x the time, mlp's 0.97-0.99x
    # (research/size_asserts.py).
    options = {"size_asserts": False} | options
    with tracing(TracingContext(fake_mode)):
        return first_conv.compile_with_choices(graph, flat, options), out_layout
