"""Which training rows each step sees: uniform shuffling or the paper's priority sampling.

Priority sampling (``good_priority``, the paper's default for A-LoL) draws rows with probability
proportional to their positive advantage ``A+`` (or positive reward ``R+`` for the reward-weighted
baselines), never a row whose weight is <= 0, with replacement, and shortens an epoch to the
positive share of the data: ``ceil(#{w > 0} / global_batch)`` steps.

With several processes every process builds the same global draw from the same seeded generator
(seed, epoch), then takes its own slice of each global batch: the processes see disjoint
positions of one draw, so a step never counts a draw twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lolrl.engine.collation import group_by_length
from lolrl.utils.errors import UserError

STRATEGIES = ("uniform", "good_priority", "good_random")


def canonical_strategy(name: str | None) -> str | None:
    """``uniform`` for the original's ``None`` (also the string ``"None"`` / ``"none"`` of old commands)."""
    return "uniform" if name in (None, "None", "none") else name


class NoPositiveRowsError(UserError):
    """Every weight is <= 0: there is nothing for priority sampling to train on."""


def sampling_weights(strategy: str, values: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    """Per-row weights for a strategy; ``None`` means uniform shuffling over all rows."""
    strategy = canonical_strategy(strategy)
    if strategy == "uniform":
        return None
    if values is None:
        raise ValueError(f"sampling strategy '{strategy}' needs advantages or rewards")
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n_rows,):
        raise ValueError(f"got {values.shape[0]} sampling values for {n_rows} rows")
    if not np.all(np.isfinite(values)):
        raise ValueError("sampling values contain NaN or inf")
    if strategy == "good_priority":
        weights = np.clip(values, 0.0, None)
    elif strategy == "good_random":
        weights = (values > 0).astype(np.float64)
    else:
        raise ValueError(f"unknown sampling strategy '{strategy}' (expected one of {', '.join(STRATEGIES)})")
    if not np.any(weights > 0):
        raise NoPositiveRowsError(
            f"all {n_rows} training rows have a non-positive {'advantage or reward'}: "
            "there is no leftover lunch to train on (check the reward scale and the value estimate)")
    return weights


@dataclass
class EpochSampler:
    """The index plan of one epoch, identical on every process, sliced per process."""

    n_rows: int
    batch_size: int  # per process
    num_processes: int = 1
    process_index: int = 0
    weights: np.ndarray | None = None
    seed: int = 0
    lengths: list[int] | None = None  # when given, each global batch holds rows of similar length

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def rows_per_epoch(self) -> int:
        return self.n_rows if self.weights is None else int(np.count_nonzero(self.weights > 0))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.rows_per_epoch / self.global_batch))

    def global_indices(self, epoch: int) -> list[int]:
        """All draws of the epoch, ``steps_per_epoch * global_batch`` of them."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        total = self.steps_per_epoch * self.global_batch
        if self.weights is None:
            # A shuffled pass; the last batch is topped up from a second permutation.
            order = torch.cat([torch.randperm(self.n_rows, generator=generator)
                               for _ in range(math.ceil(total / self.n_rows))])[:total]
        else:
            probs = torch.as_tensor(self.weights / self.weights.sum(), dtype=torch.float64)
            order = torch.multinomial(probs, total, replacement=True, generator=generator)
        indices = order.tolist()
        if self.lengths is not None:
            indices = group_by_length(indices, self.lengths, self.global_batch, seed=self.seed * 7919 + epoch)
        return indices

    def batches(self, epoch: int) -> list[list[int]]:
        """This process's share of each step of the epoch."""
        indices = self.global_indices(epoch)
        lo, hi = self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size
        return [indices[s:s + self.global_batch][lo:hi] for s in range(0, len(indices), self.global_batch)]



class PrioritySampler(torch.utils.data.Sampler):
    """The Trainer's train sampler: one epoch's global draw of :class:`EpochSampler` (uniform or priority,
    length-grouped), ``steps_per_epoch * global_batch`` item indices. Accelerate's data loader gives
    process ``p`` batch ``p, p + N, ...`` of ``per_device`` items: slice ``p`` of every global batch, as
    :meth:`EpochSampler.batches`. The epoch is set by :meth:`set_epoch` (the Trainer, and the trainer's
    schedule callback), so a resumed run draws the same batches."""

    def __init__(self, n_items: int, batch_size: int, num_processes: int = 1, weights: np.ndarray | None = None,
                 seed: int = 0, lengths: list[int] | None = None):
        self.plan = EpochSampler(n_items, batch_size, num_processes, 0, weights, seed, lengths)
        self.epoch = 0

    def __getattr__(self, name):  # rows_per_epoch, steps_per_epoch, global_batch, weights
        if name == "plan":
            raise AttributeError(name)
        return getattr(self.plan, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.plan.global_batch

    def __iter__(self):
        return iter(self.plan.global_indices(self.epoch))
