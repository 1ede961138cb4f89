"""The optional `viz` extra: matplotlib (PNG plots), pillow (images), safetensors (export), tensorboard;
and the `bench` extra: pillow, for the tutorials' reference loop.

Each is imported where it is used, through `require`: a missing one is a one-line error saying what to
install, not a traceback, and `tinymnist train` does not pay for importing them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tinymnist.errors import TinyMnistError

INSTALL = "pip install 'tinymnist[{extra}]'"

# The package to install for each module (torch's TensorBoard writer needs the tensorboard package).
PACKAGE_OF = {
    "matplotlib": "matplotlib",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "torch.utils.tensorboard": "tensorboard",
}


def require(module: str, purpose: str, extra: str = "viz") -> ModuleType:
    """Import `module` (e.g. "matplotlib.figure"), or fail naming the extra to install and `purpose`, what the
    user asked for (e.g. "plot -o")."""
    try:
        return importlib.import_module(module)
    except ImportError:  # torch.utils.tensorboard raises it too when tensorboard is missing
        package = next((p for m, p in PACKAGE_OF.items() if module == m or module.startswith(m + ".")), module)
        install = INSTALL.format(extra=extra)
        raise TinyMnistError(f"{purpose} needs {package}, which is not installed; run {install}") from None
