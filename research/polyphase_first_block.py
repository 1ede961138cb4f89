"""Is the first block of `fast` and `lenet` faster on the CPU as one matrix product (transforms/polyphase.py)?

The ways, each train's CPU step (tool/floor.cpu_steps) built and timed in turns (research/in_turns.py):

    train's          as `tinymnist train` builds it now
    plain-64         the layers as networks.py runs them, fast's batch in micro-batches of 64: train's
                     step for fast until polyphase.py
    plain-whole      the same, fast's 256 images in one call
    polyphase-64     polyphase.apply, fast's batch in micro-batches of 64 (128: polyphase-128)
    polyphase        polyphase.apply at the network's default micro-batch (the whole batch since 2026-12-07;
                     lenet's 256 before)
    channels-first   polyphase.apply with the patches stored tap-major and the product (O, positions):
                     for lenet's 6 channels, the product's output runs along the positions
    bias-in-product  polyphase.apply with the bias added by the product (addmm), not after it
    relu-after       polyphase.apply with the pool's pick as cpu_pool.first_max_pool2d makes it, ReLU after it
    taps             the first convolution as k*k shifted slices of the image times a weight each, summed
                     (one elementwise kernel for inductor to fuse with the ReLU and the pool), the
                     layers otherwise as networks.py runs them

`--check` first compares each way's compiled gradient of one batch with the plain network's eager one.

    python research/polyphase_first_block.py --data-dir DIR [--models fast,lenet] [--ways a,b] [--rounds 9]
        [--seconds 1] [--check]
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from first_block_backward import patched  # research/first_block_backward.py
from in_turns import compare, turns_parser  # research/in_turns.py

from tinymnist.algorithm import networks
from tinymnist.algorithm.config import recipe_config
from tinymnist.algorithm.train import make_gradient
from tinymnist.transforms import polyphase, speed
from tinymnist.transforms.freed_memory import reuse_freed_memory


def channels_first_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """polyphase.polyphase_block with the patches stored (k*k, positions) and the product (O, positions)."""
    batch, (channels_out, _, kernel, _) = x.shape[0], weight.shape
    padded = F.pad(x, (padding,) * 4)[:, 0]  # (B, H+2p, W+2p)
    half = (padded.shape[-1] - kernel + 1) // 2
    windows = padded.unfold(1, kernel, 1).unfold(2, kernel, 1).reshape(batch, half, 2, half, 2, kernel * kernel)
    patches = windows.permute(5, 2, 4, 0, 1, 3).reshape(kernel * kernel, -1)  # (k*k, 4*B*Y*X): tap-major
    planes = weight.view(channels_out, -1) @ patches  # (O, 4*B*Y*X)
    planes = planes.view(channels_out, 4, batch, half, half) + bias.view(-1, 1, 1, 1, 1)  # (O, 4, B, Y, X)
    first = planes.argmax(dim=1, keepdim=True)  # (O, 1, B, Y, X)
    kept = (torch.arange(4, device=x.device).view(1, 4, 1, 1, 1) == first) & ~(planes <= 0)
    return torch.where(kept, planes, 0).sum(dim=1).transpose(0, 1)  # (B, O, Y, X)


def bias_in_product_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """polyphase.polyphase_block with the bias added inside the matrix product (addmm)."""
    batch, channels_out = x.shape[0], weight.shape[0]
    patches, half = polyphase.phase_patches(x, weight.shape[-1], padding)  # (4*B*Y*X, k*k)
    planes = torch.addmm(bias, patches, weight.flatten(1).t()).view(4, batch, half, half, channels_out)
    return polyphase.relu_max_over_phases(planes).permute(0, 3, 1, 2)  # (B, O, Y, X)


def relu_after_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """polyphase.polyphase_block with ReLU applied after the pool's pick, not as a mask inside it."""
    batch, channels_out = x.shape[0], weight.shape[0]
    patches, half = polyphase.phase_patches(x, weight.shape[-1], padding)  # (4*B*Y*X, k*k)
    planes = (patches @ weight.flatten(1).t()).view(4, batch, half, half, channels_out) + bias  # (4, B, Y, X, O)
    first = planes.argmax(dim=0, keepdim=True)  # (1, B, Y, X, O)
    picked = torch.arange(4, device=x.device).view(4, 1, 1, 1, 1) == first
    return F.relu(torch.where(picked, planes, 0).sum(dim=0)).permute(0, 3, 1, 2)  # (B, O, Y, X)


def taps_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, padding: int) -> torch.Tensor:
    """The first convolution as k*k shifted slices summed, then ReLU and cpu_pool's max-pool as networks.py has them."""
    channels_out, _, kernel, _ = weight.shape  # (O, 1, k, k)
    padded = F.pad(x, (padding,) * 4)  # (B, 1, H+2p, W+2p)
    rows, cols = padded.shape[-2] - kernel + 1, padded.shape[-1] - kernel + 1
    y = bias.view(1, channels_out, 1, 1)
    for i in range(kernel):
        for j in range(kernel):
            y = y + weight[:, :, i, j].view(1, channels_out, 1, 1) * padded[:, :, i : i + rows, j : j + cols]
    return networks.max_pool2d(F.relu(y), 2)  # (B, O, H'/2, W'/2)


def block_templates(block) -> contextlib.AbstractContextManager:
    """polyphase.py's network with `block` in polyphase_block's place (a module global, which dynamo guards on
    and direct_call traces anew for each step built)."""
    return mock.patch.object(polyphase, "polyphase_block", block)


def taken(models: set[str], chunk: int | None = None) -> contextlib.AbstractContextManager:
    """speed.py's choices patched: polyphase.apply for `models`, the CPU micro-batch `chunk` (None: the default)."""
    if chunk is None:
        return patched((speed, "CPU_POLYPHASE", models))
    return patched((speed, "CPU_POLYPHASE", models), (speed, "default_micro_batch", lambda *args, **kwargs: chunk))


WAYS = {
    "plain-64": lambda: taken(set(), 64),
    "plain-whole": lambda: taken(set()),
    "polyphase-64": lambda: taken({"fast"}, 64),
    "polyphase-128": lambda: taken({"fast"}, 128),
    "polyphase": lambda: taken({"fast", "lenet"}),
    "channels-first": lambda: patched(taken({"fast", "lenet"}), block_templates(channels_first_block)),
    "bias-in-product": lambda: patched(taken({"fast", "lenet"}), block_templates(bias_in_product_block)),
    "relu-after": lambda: patched(taken({"fast", "lenet"}), block_templates(relu_after_block)),
    "taps": lambda: patched(taken({"fast", "lenet"}), block_templates(taps_block)),
}


def check(model: str, images: torch.Tensor, labels: torch.Tensor, ways: dict) -> None:
    """Each way's compiled gradient of one batch (of the network's micro-batch size, at most 256) against the
    plain network's eager one."""
    config = recipe_config(model)
    params = networks.init_params(model, seed=0)
    batch_idx = torch.arange(min(config.batch_size, speed.CPU_MICRO_BATCH))
    plain, _ = make_gradient(config)(params, images, labels, batch_idx)
    for name, way in ways.items():
        with way():
            apply = speed.network_apply(config, torch.device("cpu"), compile=True)
            grads, _ = speed.compiled(make_gradient(config, apply))(params, images, labels, batch_idx)
        worst = max(float((grads[k] - plain[k]).abs().max() / plain[k].abs().max()) for k in plain)
        print(
            f"{model}: {name}: {apply.__module__}.apply's gradients within {worst:.1e} of the plain eager ones",
            flush=True,
        )
        assert worst < 1e-5, f"{name}'s gradients are not autograd's"  # float32 sums in another order: ~1e-6


def main() -> None:
    parser = turns_parser(__doc__, seconds=1.0)
    parser.add_argument("--ways", default="plain-64,plain-whole,polyphase-64,polyphase-128")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    reuse_freed_memory()  # as the command line does
    compare(args, {name: WAYS[name] for name in args.ways.split(",") if name}, check)


if __name__ == "__main__":
    main()
