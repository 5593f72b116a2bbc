"""The optimizer, by its ``transformers`` name (``--optim``), resolved as the HF Trainer resolves it.

``paged_adamw_32bit`` (the original HH scripts' default) and the other bitsandbytes optimizers
need CUDA and ``bitsandbytes`` (``pip install -e .[cuda]``); without them the run falls back to
``adamw_torch`` with the same learning rate, betas, eps and weight decay, and one warning says
what differs (optimizer state is neither paged to CPU memory nor quantised).
"""
from __future__ import annotations

import logging

import torch

from lolrl.utils.errors import ConfigError

logger = logging.getLogger(__name__)
FALLBACK = "adamw_torch"
_warned: set[str] = set()


def optimizer_names() -> tuple[str, ...]:
    from transformers.training_args import OptimizerNames

    return tuple(o.value for o in OptimizerNames)


def needs_cuda(name: str) -> bool:
    """The bitsandbytes optimizers (paged, 8-bit, ``*_bnb*``)."""
    return "paged" in name or "bnb" in name or name.endswith("8bit") or name in ("lion_32bit",)


def resolve(name: str) -> str:
    """``name`` itself, or :data:`FALLBACK` (with one warning) when it needs CUDA + bitsandbytes that are absent."""
    if name not in optimizer_names():
        raise ConfigError(f"--optim: unknown optimizer '{name}' (expected a transformers optimizer name, "
                          f"e.g. adamw_torch or paged_adamw_32bit)")
    if not needs_cuda(name):
        return name
    missing = [] if torch.cuda.is_available() else ["CUDA"]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        missing.append("bitsandbytes (pip install -e .[cuda])")
    if not missing:
        return name
    if name not in _warned:
        _warned.add(name)
        logger.warning("--optim %s needs %s: using %s instead, with the same lr, betas, eps and weight decay; "
                       "its optimizer state is neither paged to CPU memory nor quantised (more GPU memory, "
                       "same update rule up to %s's rounding)", name, " and ".join(missing), FALLBACK, name)
    return FALLBACK


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters (weight decay on the matrices, not on
    biases and norms), built by ``transformers.Trainer.get_optimizer_cls_and_kwargs`` so that a name
    means what it means in the HF Trainer."""
    from types import SimpleNamespace

    from transformers import Trainer
    from transformers.training_args import OptimizerNames

    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    # The attributes the resolver reads (a TrainingArguments would reset Accelerate's state).
    args = SimpleNamespace(optim=OptimizerNames(resolve(name)), learning_rate=lr, adam_beta1=betas[0],
                           adam_beta2=betas[1], adam_epsilon=eps, optim_args=None)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return cls(groups, **{**kwargs, "weight_decay": weight_decay})
