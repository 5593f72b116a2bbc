"""A model's trainable parameters loaded strictly, below both checkpoint formats: PPO's own
(:mod:`lolrl.utils.checkpoint`) and the sharded runs' best-model restore (:mod:`lolrl.utils.sharded`)."""
from __future__ import annotations

import torch

from lolrl.utils.manifest import IntegrityError


def load_trainable(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into the model's trainable parameters strictly: exactly the same names, shapes
    and dtypes (the frozen weights come from the starting model), or :class:`IntegrityError`."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise IntegrityError(f"{source}: does not match the model's trainable parameters "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, param in params.items():
        value = tensors[name]
        if value.shape != param.shape or value.dtype != param.dtype:
            raise IntegrityError(f"{source}: '{name}' is {value.dtype} {tuple(value.shape)}, the model's "
                                 f"{param.dtype} {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
