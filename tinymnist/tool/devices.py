"""Which device to train on, and what this machine's PyTorch can reach (`tinymnist info`)."""

from __future__ import annotations

import torch

from tinymnist.errors import TinyMnistError
from tinymnist.transforms import first_conv, freed_memory
from tinymnist.transforms.denormals import flushed_in_every_thread


def resolve_device(name: str) -> torch.device:
    """Turn --device (auto, cpu, cuda, cuda:N, mps) into a device that exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinyMnistError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TinyMnistError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}); "
                "use --device cpu or --device auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise TinyMnistError(f"--device {name}: only {count} CUDA device(s) here; use cuda:0 to cuda:{count - 1}")
    elif device.type not in ("cpu", "mps"):
        raise TinyMnistError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise TinyMnistError(f"--device {name}: MPS is not available here; use --device cpu or --device auto")
    return device


def first_conv_setting() -> str:
    """How a compiled CPU step computes a first convolution's weight gradient (transforms/first_conv.py)."""
    try:
        choice = first_conv.environment_choice()
    except TinyMnistError as error:
        return str(error)
    return {
        "measured": "the faster kernel, measured when compiled",
        "always": f"as a forward conv ({first_conv.CHOICE_ENV}=always)",
        "never": f"oneDNN's backward ({first_conv.CHOICE_ENV}=never)",
    }[choice]


def accelerator_report() -> list[tuple[str, str]]:
    """(what, value) rows for `tinymnist info`, with a small matmul on each accelerator."""
    rows = [
        ("torch", torch.__version__),
        ("CUDA build", torch.version.cuda or "none (CPU build)"),
        ("CUDA available", str(torch.cuda.is_available())),
        ("MPS available", str(torch.backends.mps.is_available())),
        ("CPU threads", str(torch.get_num_threads())),
        ("CPU denormals", "flushed to zero in every thread" if flushed_in_every_thread() else "not flushed (slower)"),
        ("First conv gradient", first_conv_setting()),
        ("Freed memory", "kept for the next step (malloc)" if freed_memory.reusing else "returned to the system"),
    ]
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    rows.append(("accelerators", str(len(devices))))
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "Apple MPS"
        rows.append((str(device), f"{name}: {_matmul_check(device)}"))
    return rows


def _matmul_check(device: torch.device) -> str:
    """A 256x256 matmul on `device` against the CPU's (TF32 and reduced-precision kernels stay well within 1e-2)."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    ok = torch.allclose((a.to(device) @ b.to(device)).cpu(), a @ b, rtol=1e-2, atol=1e-2)
    return "matmul ok" if ok else "matmul MISMATCH against the CPU"
