"""Checkpoints: params, optimizer state, epoch, RNG states and config, saved atomically.

Plain data loaded with `weights_only=True`, so loading one never runs code. A save that
fails (full disk, crash, Ctrl-C) leaves the previous checkpoint intact. Loading checks the
whole structure (checkpoint_format.py): a damaged file is one line, not a torch traceback.
"""

from __future__ import annotations

import errno
import io
import warnings
import zipfile
from pathlib import Path

import torch

from tinymnist.algorithm.train import TrainState
from tinymnist.algorithm.trees import tree_map
from tinymnist.data import files
from tinymnist.errors import TinyMnistError
from tinymnist.tool import interrupts
from tinymnist.tool.checkpoint_format import FORMAT, Damaged, brief, check_payload

# What to do about a save that failed, by the error the OS gave; anything else: another path.
SAVE_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
    errno.ENAMETOOLONG: "choose a shorter name",
}


def save(path: Path, config: dict, state: TrainState) -> None:
    """Write the checkpoint to `path` atomically; Ctrl-C or SIGTERM waits until it is done.
    A write that fails raises TinyMnistError saying which checkpoint `path` still holds."""
    payload = {
        "format": FORMAT,
        "config": config,
        "epoch": state.epoch,
        "params": tree_map(on_cpu, state.params),
        "opt_state": tree_map(on_cpu, state.opt_state),
        "rng": tree_map(on_cpu, state.rng),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: a failing write is then a plain OSError
    try:
        with interrupts.shielded(), files.atomic_write(path) as file:
            file.write(buffer.getbuffer())
    except OSError as e:
        advice = SAVE_ADVICE.get(e.errno, "choose another path")
        raise TinyMnistError(
            f"checkpoint {path}: saving epoch {state.epoch} failed ({e.strerror or e}); {_previous(path)}; {advice}"
        ) from None


def _previous(path: Path) -> str:
    """What `path` holds after a failed save (a peek at its epoch: mmap reads no tensor data)."""
    try:
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except FileNotFoundError:
        return "there is no previous checkpoint, so none is kept"
    except Exception:  # not a checkpoint of ours: it is still left as it was
        return "the file already there is left as it was"
    return f"the previous checkpoint (epoch {epoch}) is kept" if type(epoch) is int else "the previous file is kept"


def load(path: Path, device: torch.device) -> tuple[dict, TrainState]:
    """Read a checkpoint back as (config dict, TrainState on `device`), validated whole."""
    files.check_readable(path, "checkpoint")
    try:
        # A forged sparse tensor fails here; torch's warnings are hushed: the refusal below says it in one line.
        with torch.sparse.check_sparse_tensor_invariants(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TinyMnistError(f"checkpoint {path}: no such file") from None
    except OSError as e:
        raise TinyMnistError(f"checkpoint {path}: cannot read it ({e.strerror or brief(str(e))})") from None
    except Exception as e:  # unpickling errors come in many types; all mean "not a checkpoint"
        raise TinyMnistError(f"checkpoint {path}: not a readable tinymnist checkpoint ({_why(e, path)})") from None
    try:
        config, params, opt_state, epoch, rng = check_payload(payload, torch.device(device))
    except Damaged as e:
        raise TinyMnistError(f"checkpoint {path}: {e}") from None
    return config, to_device(TrainState(params, opt_state, epoch, rng), device)


def _why(error: Exception, path: Path) -> str:
    """What is wrong with the file, in words: torch.load's own complaint only where it says more than
    that (a text file reads as a broken pickle, "pop from empty list"; a cut-off one as a zip error),
    and never its advice to pass weights_only=False, which would run the file's code."""
    if "Weights only load failed" in str(error) or isinstance(error, KeyError):  # KeyError: no torch.save records
        return "it is not a torch.save file of tensors, numbers and strings"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive, whose index is at its end
        return "it is not a whole file written by torch.save: cut off, or another kind of file"
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("/data.pkl") for name in archive.namelist()):  # torch.save's record of objects
            return "a zip archive, but not one written by torch.save"
    return brief(str(error)) or type(error).__name__


def to_device(state: TrainState, device: torch.device) -> TrainState:
    """The same state with params and optimizer state on `device` (RNG states stay on the CPU)."""
    moved = lambda t: t.detach().to(device)  # noqa: E731
    return TrainState(tree_map(moved, state.params), tree_map(moved, state.opt_state), state.epoch, state.rng)


def on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu()


def peek(path: str | Path) -> dict | None:
    """The entries of the tinymnist checkpoint at `path`, unchecked and memory-mapped (no tensor
    data is read); None when there is none."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, unreadable, not a torch file: not a checkpoint
        return None
    return payload if isinstance(payload, dict) and payload.get("format") == FORMAT else None
