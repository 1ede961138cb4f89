"""Which device to train on, and what this machine's PyTorch can reach (`tinymnist info`)."""

from __future__ import annotations

import torch

from tinymnist.errors import TinyMnistError


def resolve_device(name: str) -> torch.device:
    """Turn --device (auto, cpu, cuda, cuda:N, mps) into a device that exists here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
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
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TinyMnistError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise TinyMnistError(f"--device {name}: MPS is not available here; use --device cpu or --device auto")
    elif device.type != "cpu":
        raise TinyMnistError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def accelerator_report() -> list[tuple[str, str]]:
    """(what, value) rows for `tinymnist info`, with a small matmul on each accelerator."""
    rows = [
        ("torch", torch.__version__),
        ("CUDA build", torch.version.cuda or "none (CPU build)"),
        ("CUDA available", str(torch.cuda.is_available())),
        ("MPS available", str(torch.backends.mps.is_available())),
        ("CPU threads", str(torch.get_num_threads())),
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
    """Multiply two 256x256 matrices on `device` and compare with the CPU result."""
    a = torch.randn(256, 256)
    b = torch.randn(256, 256)
    on_device = (a.to(device) @ b.to(device)).cpu()
    # TF32 or reduced-precision kernels differ from the CPU by far less than this.
    ok = torch.allclose(on_device, a @ b, rtol=1e-2, atol=1e-2)
    return "matmul ok" if ok else "matmul MISMATCH against the CPU"
