"""Checkpoints: params, optimizer state, epoch, RNG states and config, atomically.

A checkpoint is plain data (tensor dicts, numbers, strings), saved with torch.save
and loaded with `weights_only=True`, so loading one can never run code.
It is written to a temporary file beside the target and renamed over it: a crash or
Ctrl-C mid-write leaves the previous checkpoint intact, never a truncated one.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch

from tinymnist import models
from tinymnist.config import TrainConfig
from tinymnist.errors import TinyMnistError
from tinymnist.train import TrainState

FORMAT = "tinymnist-checkpoint-v1"
# TrainConfig fields added after the first checkpoints were written: a checkpoint
# without them loads, and they take their defaults.
ADDED_FIELDS = {"micro_batch", "cuda_graphs"}


def check_writable(path: Path) -> None:
    """Fail before training, not after an hour of it, when --save-model cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise TinyMnistError(f"--save-model {path}: is a folder; give a file path such as {path / 'cnn.pt'}")
    if not folder.is_dir():
        raise TinyMnistError(f"--save-model {path}: folder {folder} does not exist; create it first")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TinyMnistError(
            f"--save-model {path}: cannot write in {folder} ({e.strerror}); choose another path"
        ) from None


def save(path: Path, config: dict, state: TrainState) -> None:
    """Write the checkpoint to `path` atomically (temp file in the same folder + rename)."""
    payload = {
        "format": FORMAT,
        "config": config,
        "epoch": state.epoch,
        "params": {k: v.detach().cpu() for k, v in state.params.items()},
        "opt_state": _to_cpu(state.opt_state),
        "rng": {k: v.cpu() for k, v in state.rng.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path: Path, device: torch.device) -> tuple[dict, TrainState]:
    """Read a checkpoint back as (config dict, TrainState on `device`), validated."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TinyMnistError(f"checkpoint {path}: no such file") from None
    except Exception as e:  # unpickling errors come in many types; all mean "not a checkpoint"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinyMnistError(f"checkpoint {path}: not a readable tinymnist checkpoint ({reason[:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TinyMnistError(f"checkpoint {path}: not a tinymnist checkpoint (expected format {FORMAT})")
    missing = {"config", "epoch", "params", "opt_state", "rng"} - payload.keys()
    if missing:
        raise TinyMnistError(f"checkpoint {path}: damaged, it lacks {', '.join(sorted(missing))}")
    config = payload["config"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(config, dict) or not fields - ADDED_FIELDS <= set(config) <= fields:
        raise TinyMnistError(f"checkpoint {path}: its config does not match this version of tinymnist")
    _check_params(path, config["model"], payload["params"])
    state = TrainState(payload["params"], payload["opt_state"], int(payload["epoch"]), payload["rng"])
    return config, to_device(state, device)


def to_device(state: TrainState, device: torch.device) -> TrainState:
    """The same state with params and optimizer state on `device` (RNG states stay on the CPU)."""
    return TrainState(_to_device(state.params, device), _to_device(state.opt_state, device), state.epoch, state.rng)


def _check_params(path: Path, model: str | None, params: dict) -> None:
    """The saved tensors must be exactly the model's parameters, name for name, shape for shape."""
    if model not in models.MODEL_NAMES:
        raise TinyMnistError(f"checkpoint {path}: unknown model {model!r}")
    expected = {k: tuple(v.shape) for k, v in models.init_params(model, 0, "meta").items()}
    found = {k: tuple(v.shape) for k, v in params.items()}
    if found != expected:
        raise TinyMnistError(
            f"checkpoint {path}: parameters do not match model {model!r} (the file is damaged or from another version)"
        )


def _to_cpu(tree):
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    return tree.detach().cpu()


def _to_device(tree, device: torch.device):
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree.to(device)
