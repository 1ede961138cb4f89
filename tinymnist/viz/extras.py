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

# The distribution that provides each module (they differ for pillow).
PACKAGE_OF = {"matplotlib": "matplotlib", "PIL": "pillow", "safetensors": "safetensors", "torch": "tensorboard"}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` (e.g. "matplotlib.figure"), or fail naming the extra to install.

    purpose: what the user asked for, e.g. "plot -o", so the message says why.
    """
    try:
        return importlib.import_module(module)
    except ImportError:  # torch.utils.tensorboard raises it too when tensorboard is missing
        package = PACKAGE_OF.get(module.split(".")[0], module)
        raise TinyMnistError(f"{purpose} needs {package}, which is not installed; run {INSTALL}") from None
