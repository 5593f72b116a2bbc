"""Non-finite numbers never pass: one guard for every optimizer step, one check for every saved state.

:class:`StepGuard` is what the offline trainer and PPO call between ``backward`` and
``optimizer.step``: a step whose loss or gradient holds a NaN/inf is skipped (no parameter
update, a warning), and after ``max_in_a_row`` such steps in a row the run stops with a
:class:`NonFiniteError`. :func:`check_finite_state` refuses to save (or select as best) a model
or adapter with a non-finite parameter.
"""
from __future__ import annotations

import logging
import math

import torch

from lolrl.utils.errors import UserError
from lolrl.utils.processes import on_every_process

logger = logging.getLogger(__name__)

class NonFiniteError(UserError):
    """Training produced (or was about to save) NaN/inf: the run stops instead of going on silently wrong."""


def gradients_finite(parameters) -> bool:
    """Whether every gradient present is finite (one fused reduction, one host sync)."""
    flags = [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


class StepGuard:
    """Watch each optimizer step; ``allow_step(losses, parameters)`` says whether to apply it."""

    def __init__(self, max_in_a_row: int = 3, accelerator=None, what: str = "training"):
        if max_in_a_row < 1:
            raise UserError(f"max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row, self.accelerator, self.what = max_in_a_row, accelerator, what
        self.in_a_row = 0
        self.skipped = 0

    def _checked_parameters(self, model) -> list:
        """The parameters whose gradients are checked: none under fp16 loss scaling, whose scaler skips
        an overflowing step itself (and lowers its scale; the loss is still checked)."""
        if getattr(self.accelerator, "scaler", None) is not None:
            return []
        return [p for p in model.parameters() if p.grad is not None]

    def allow_step(self, losses: list[float], model, step: int) -> bool:
        """``losses``: the step's (micro-batch) loss values; ``model``: its gradients filled by backward."""
        ok = all(math.isfinite(v) for v in losses) and gradients_finite(self._checked_parameters(model))
        if on_every_process(self.accelerator, ok):  # every process skips the same steps
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.what}: non-finite loss or gradient at {self.in_a_row} steps in a row (last: step {step}); "
                "stopped (check the rewards' scale, lower the learning rate, or use fp32); "
                "the last checkpoint and the best model saved so far are intact")
        logger.warning("%s step %d: non-finite loss or gradient: step skipped (%d in a row, stop at %d)",
                       self.what, step, self.in_a_row, self.max_in_a_row)
        return False


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN/inf, else None."""
    for name, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to save ``what`` (a model, adapter or checkpoint) that holds a non-finite parameter."""
    bad = first_non_finite(state)
    if bad is not None:
        raise NonFiniteError(f"{what}: parameter '{bad}' is not finite: not saved (the previous save is intact)")


def check_finite_model(model, what: str) -> None:
    check_finite_state({n: p.detach() for n, p in model.named_parameters()}, what)
