"""What a checkpoint holds, and the check that a loaded one holds exactly that.

torch.load(weights_only=True) guarantees plain data, not the right data (a float64 weight,
an epoch of True), which would end later in a traceback from deep inside eval or resume.
So every part is compared with what this version of tinymnist writes:

    format     FORMAT
    config     TrainConfig's fields, each of its annotated type, and config.validate passes
    epoch      an int >= 0 (not a bool, not a float)
    params     keys, shapes and dtypes of a freshly initialised state (`fresh_state`)
    opt_state  the same: what the optimizer's own `init` builds from those params
    rng        RNG_STATES, uint8 tensors that a generator accepts

Built from the code on the `meta` device, the check needs nothing new for a new network or
optimizer. Non-finite values are data, not damage: NaN weights load, eval reports a NaN loss.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import torch

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import TrainConfig, make_optimizer, validate
from tinymnist.algorithm.train import per_model
from tinymnist.errors import TinyMnistError

FORMAT = "tinymnist-checkpoint-v1"
ENTRIES = ("format", "config", "epoch", "params", "opt_state", "rng")
# Generator states a checkpoint holds, and whether it must: the global CPU generator (dropout),
# each model's shuffling generator, the CUDA generator of a CUDA run.
RNG_STATES = {"cpu": True, "shuffle": True, "cuda": False}
UNFIT = "the file is damaged or does not match this version of tinymnist"


class Damaged(Exception):
    """What is wrong with a checkpoint's contents, in words that follow its file name."""


def check_payload(payload, device: torch.device) -> tuple[dict, dict, dict, int, dict]:
    """(config, params, opt_state, epoch, rng), or raise Damaged. The tensors are contiguous copies
    in the expected dicts' key order (the compiled step guards on it): nothing aliases the file."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        weights = isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values())
        export = "; it holds weights alone (a state_dict, such as `tinymnist export` writes)" if weights else ""
        raise Damaged(f"not a tinymnist checkpoint (expected format {FORMAT}){export}; give one --save-model wrote")
    _same_keys("it", payload, ENTRIES)
    config = check_config(payload["config"])
    epoch = payload["epoch"]
    if type(epoch) is not int or epoch < 0:
        raise Damaged(f"its epoch is {brief(repr(epoch))}, not a whole number >= 0; {UNFIT}")
    train_config = TrainConfig(**config)
    fresh = fresh_state(train_config)  # what this version writes for the config, on `meta`
    params = _match(payload["params"], fresh["params"], f"params do not match model {config['model']!r}")
    what = f"the optimizer state does not match {config['optimizer']}"
    opt_state = _match(payload["opt_state"], fresh["opt_state"], what)
    return config, params, opt_state, epoch, check_rng(payload["rng"], device, train_config.n_models)


def fresh_state(config: TrainConfig) -> dict:
    """The config's freshly initialised params and optimizer state, stacked for N models, as meta
    tensors (shapes and dtypes, no memory)."""
    params = [networks.init_params(config.model, 0, "meta")] * config.n_models
    opt_state = [make_optimizer(config).init(p) for p in params]
    stacked = config.n_models > 1
    return {"params": per_model(params, stacked), "opt_state": per_model(opt_state, stacked)}


def check_config(config) -> dict:
    """The stored config: every field of TrainConfig, each of the right type, and valid."""
    if not isinstance(config, dict):
        raise Damaged(f"its config is {_a(config)}, not a dict; {UNFIT}")
    types_ = typing.get_type_hints(TrainConfig)
    missing = sorted(set(types_) - config.keys())
    extra = sorted(map(str, config.keys() - types_.keys()))
    if missing or extra:
        raise Damaged(f"its config does not match this version of tinymnist ({_listed(missing, extra)})")
    for name, value in config.items():
        if not _is_a(value, types_[name]):
            expected = getattr(types_[name], "__name__", str(types_[name])).replace("NoneType", "None")
            raise Damaged(f"its config has {name} = {brief(repr(value))}, not {expected}; {UNFIT}")
    try:
        return dataclasses.asdict(validate(TrainConfig(**config)))
    except TinyMnistError as e:
        raise Damaged(f"its stored config is invalid: {e}") from None


def check_rng(rng, device: torch.device, n_models: int = 1) -> dict:
    """RNG_STATES, each a byte tensor that a fresh generator of its kind accepts; with N models,
    "shuffle" is (N, bytes): one state per model."""
    if not isinstance(rng, dict):
        raise Damaged(f"its rng is {_a(rng)}, not a dict; {UNFIT}")
    required = [k for k, needed in RNG_STATES.items() if needed]
    _same_keys("its rng", rng, required, optional=RNG_STATES)
    checked = {}
    for name, state in rng.items():
        where = f"its {name} generator state"
        rows = n_models if name == "shuffle" and n_models > 1 else None
        dims = 1 if rows is None else 2
        is_bytes = isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == dims
        if not is_bytes or (rows is not None and len(state) != rows):
            shape = "a 1-d uint8 tensor" if rows is None else f"a uint8 tensor of {rows} rows, one per model"
            raise Damaged(f"{where} is not {shape}; {UNFIT}")
        _check_dense(state, where)
        if name != "cuda" or device.type == "cuda":  # a CUDA state is only checked where it will be restored
            generator = torch.Generator(device) if name == "cuda" else torch.Generator()
            try:
                for one in [state] if rows is None else state:
                    generator.set_state(one.clone())  # a row as a view crashed torch 2.13
            except RuntimeError as e:
                raise Damaged(f"{where} is invalid ({brief(str(e))}); {UNFIT}") from None
        checked[name] = state.clone()
    return checked


def _match(found, expected, what: str, at: str = ""):
    """`found` as a tree shaped like `expected` (keys, dtypes, shapes), or raise naming the leaf."""
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            raise Damaged(f"{what}: {at or 'it'} is {_a(found)}, not a dict; {UNFIT}")
        _same_keys(f"{what}: {at or 'it'}", found, expected)
        return {k: _match(found[k], v, what, f"{at}/{k}" if at else k) for k, v in expected.items()}
    if not isinstance(found, torch.Tensor):
        raise Damaged(f"{what}: {at} is {_a(found)}, not a tensor; {UNFIT}")
    _check_dense(found, f"{what}: {at}")
    if found.dtype != expected.dtype:
        raise Damaged(f"{what}: {at} is {_dtype(found)}, not {_dtype(expected)}; {UNFIT}")
    if found.shape != expected.shape:
        raise Damaged(f"{what}: {at} has shape {tuple(found.shape)}, not {tuple(expected.shape)}; {UNFIT}")
    return found.detach().clone(memory_format=torch.contiguous_format)


def _check_dense(tensor: torch.Tensor, where: str) -> None:
    if tensor.layout != torch.strided or tensor.is_nested:
        raise Damaged(f"{where} is a {str(tensor.layout).removeprefix('torch.')} tensor, not a dense one; {UNFIT}")
    if tensor.is_meta:
        raise Damaged(f"{where} is a meta tensor, which holds no values; {UNFIT}")


def _same_keys(where: str, found: dict, required, optional=()) -> None:
    missing = sorted(set(required) - found.keys())
    extra = sorted(map(str, found.keys() - set(required) - set(optional)))
    if missing or extra:
        raise Damaged(f"{where} {_listed(missing, extra)}; {UNFIT}")


def _listed(missing: list, extra: list) -> str:
    parts = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has extra {', '.join(extra)}"] if extra else [])
    return brief(" and ".join(parts))


def _is_a(value, annotation) -> bool:
    """isinstance against a config annotation; exact, so True is no int and 1 no bool."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_a(value, option) for option in typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return type(value) is list and all(_is_a(v, item) for v in value)
    if annotation is float:  # a whole-number learning rate is still a number
        return type(value) in (float, int)
    return type(value) is annotation


def _a(value) -> str:
    """'an int', 'a list', 'None': what a value is, in words."""
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def brief(text: str, limit: int = 100) -> str:
    """The first line of `text`, cut at a word boundary with an ellipsis when long (or '')."""
    stripped = text.strip()
    line = stripped.splitlines()[0] if stripped else ""
    if len(line) <= limit:
        return line
    head = line[: limit + 1]
    if " " not in head:
        return ""  # one unbroken word: better not quoted than cut mid-word
    return head.rsplit(" ", 1)[0].rstrip(" ,;:") + " …"
