"""The optional `viz` extra: pictures need packages the base install does not bring.

`pip install 'tinymnist[viz]'` adds matplotlib (PNG plots), pillow (reading images,
PNG digits), safetensors (export) and tensorboard (train --tensorboard). Each is
imported only where it is used, through `require`, so that a missing one is a
one-line error saying what to install, not a traceback, and `tinymnist train`
starts as fast as before.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tinymnist.errors import TinyMnistError

INSTALL = "pip install 'tinymnist[viz]'"

# The package to install for each module we import (pillow's is PIL; torch's TensorBoard
# writer is part of torch but needs the tensorboard package).
PACKAGE_OF = {
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "torch.utils.tensorboard": "tensorboard",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. "matplotlib.figure"), or fail naming the extra to install.

    purpose: what the user asked for, e.g. "plot -o", so the message says why.
    """
    try:
        return importlib.import_module(module)
    except ImportError:  # torch.utils.tensorboard raises it too when tensorboard is missing
        package = next((p for m, p in PACKAGE_OF.items() if module == m or module.startswith(m + ".")), module)
        raise TinyMnistError(f"{purpose} needs {package}, which is not installed; run {INSTALL}") from None
