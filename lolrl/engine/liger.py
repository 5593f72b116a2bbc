"""Liger's fused linear cross-entropy as the output layer's log-prob kernel (optional, CUDA).

``liger_fused_linear_cross_entropy(..., reduction="none")`` applies the output layer and the
log-softmax in one Triton kernel, chunk by chunk, without a [tokens, vocab] tensor in memory; its
per-token loss is -log pi(y_t | ...). From liger-kernel 0.8.5 the backward of ``reduction="none"``
recomputes the chunks and takes a per-token upstream gradient (the A-LoL weights), which is what a
weighted sum of log-probs needs. Install with ``pip install -e .[liger]`` (liger-kernel and triton).

The kernels are Triton: they run on CUDA, or on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set before liger_kernel is imported; slow, for tests only).
"""
from __future__ import annotations

import functools
import os
from importlib.metadata import PackageNotFoundError, version

import torch

LIGER_MIN_VERSION = (0, 8, 5)  # reduction="none" with per-token gradients


@functools.cache
def installed_version() -> tuple[int, ...] | None:
    try:
        text = version("liger-kernel")
    except PackageNotFoundError:
        return None
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def refusal(layer, transform, device: torch.device, sharded: bool = False, interpreter: bool = False) -> str | None:
    """Why Liger's kernel cannot give this output layer's log-probs here; None when it can.
    ``interpreter``: accept a CPU device when ``TRITON_INTERPRET=1`` (an explicit request only)."""
    found = installed_version()
    if found is None:
        return "liger-kernel is not installed (pip install -e .[liger])"
    if found < LIGER_MIN_VERSION:
        return (f"liger-kernel {'.'.join(map(str, found))} is older than "
                f"{'.'.join(map(str, LIGER_MIN_VERSION))} (per-token gradients of reduction='none')")
    if device.type != "cuda" and not (interpreter and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"its Triton kernels run on CUDA, this run is on {device.type} (TRITON_INTERPRET=1 runs them, slowly)"
    if type(layer) is not torch.nn.Linear:
        return f"the output layer is a {type(layer).__module__}.{type(layer).__name__}, not a plain Linear " \
               "(a LoRA adapter or quantisation on it)"
    if sharded or type(layer.weight).__name__ == "DTensor" or hasattr(layer.weight, "ds_id"):
        return "the output layer's weight is sharded (FSDP or ZeRO-3)"
    if transform is not None and transform.softcap and device.type != "cuda":
        return "Liger's soft-capping runs on CUDA only (Triton's interpreter passes its scalar as a Python float)"
    if transform is not None and transform.factor is not None and layer.bias is not None:
        return "the model scales its logits and its output layer has a bias"
    return None


def logprobs(layer: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, transform=None) -> torch.Tensor:
    """log-softmax(transform(layer(hidden)))[targets] per row of ``hidden`` [N, H], in fp32, through Liger.
    A logit scale is folded into ``hidden`` (exact: the layer has no bias); soft-capping is Liger's own."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    weight = layer.weight
    if transform is not None and transform.factor is not None:
        hidden = hidden * transform.factor
    if hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(weight.dtype)
    nll = liger_fused_linear_cross_entropy(hidden, weight, targets, layer.bias, reduction="none",
                                           softcap=None if transform is None else transform.softcap)
    return -nll.float()
