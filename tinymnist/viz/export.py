"""`tinymnist export CHECKPOINT -o model.pt`: the weights as the tutorial's own nn.Module loads them.

A checkpoint's params carry the tutorials' names (`conv1.weight`, ...) but for the LeNet
tutorial's nn.Sequential blocks (`conv1.0.weight`). The result loads with `strict=True`
and computes exactly what `tinymnist eval` computes.

    model.pt, model.pth    torch.save(state_dict); read it back with torch.load(path, weights_only=True)
    model.safetensors      no pickle, readable from other languages; the metadata holds the
                           model name and its input scaling (mean, std)
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from tinymnist.algorithm.config import RECIPES
from tinymnist.errors import TinyMnistError
from tinymnist.tool.extras import require
from tinymnist.tool.outputs import LOCK_ADVICE, atomic_output

# tinymnist module name -> the tutorial's, where they differ
TUTORIAL_MODULE_NAMES = {"lenet": {"conv1": "conv1.0", "conv2": "conv2.0", "fc1": "fc1.0", "fc2": "fc2.0"}}
SUFFIXES = (".pt", ".pth", ".safetensors")


def tutorial_state_dict(model: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The params under the tutorial module's state_dict names, on the CPU, contiguous."""
    renames = TUTORIAL_MODULE_NAMES.get(model, {})
    state = {}
    for name, tensor in params.items():
        module, _, kind = name.rpartition(".")  # "conv1", "weight"
        state[f"{renames.get(module, module)}.{kind}"] = tensor.detach().cpu().contiguous()
    return state


def check_export_name(path: Path) -> None:
    """Before any work: a suffix that names a format, and that format's package if it is an extra."""
    if Path(path).is_dir():
        raise TinyMnistError(f"-o {path} is a folder; give a file path such as {Path(path) / 'model.pt'}")
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise TinyMnistError(f"-o {path}: name the file .pt, .pth or .safetensors; the suffix picks the format")
    if suffix == ".safetensors":
        require("safetensors.torch", "export to .safetensors")


def export_state_dict(model: str, params: dict[str, torch.Tensor], path: Path) -> None:
    """Write the tutorial-named state_dict to `path` atomically, in the format its suffix names:
    `path` is replaced, or stays as it was and no temporary file is left."""
    path = Path(path)
    check_export_name(path)
    state = tutorial_state_dict(model, params)
    # The bytes are made in memory (a state_dict is a few MB) so that a failed write is an
    # OSError: torch.save's zip writer, failing on a file, raises a RuntimeError ("unexpected pos").
    if path.suffix.lower() == ".safetensors":
        recipe = RECIPES[model]
        metadata = {"model": model, "mean": repr(recipe.mean), "std": repr(recipe.std)}  # safetensors wants strings
        payload = require("safetensors.torch", "export to .safetensors").save(state, metadata=metadata)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
    with atomic_output(path) as f:
        try:
            f.write(payload)
            f.flush()  # a full disk or a size limit shows here, where the advice can name it
        except OSError as e:  # outputs' advice by errno (made for its lock files): ulimit -f, a full disk
            advice = f"{LOCK_ADVICE[e.errno]} or " if e.errno in LOCK_ADVICE else ""
            raise TinyMnistError(
                f"-o {path}: cannot be written ({e.strerror}); {advice}choose another folder; nothing was written"
            ) from None
