"""Uncertainty of a comparison between two runs: the paired bootstrap over test prompts.

Two runs evaluated on the same test prompts give, per prompt, a score each; their difference on a
prompt is one pair. With several seeds each seed gives a pair per prompt (run A's seed s against
run B's seed s). :func:`paired_bootstrap` resamples the *prompts* with replacement (a prompt brings
all its seeds' pairs along: the seeds are pooled, and a prompt's pairs stay together since they
share the prompt's difficulty) and reports the mean difference with the percentile interval of the
resampled means. The generator is seeded, so the same pairs give the same interval.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "mean_and_std", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """The mean paired difference (A - B) over every (seed, prompt) pair and its bootstrap interval."""

    mean: float
    low: float
    high: float
    prompts: int  # distinct prompts resampled
    pairs: int  # (seed, prompt) pairs, all seeds pooled
    confidence: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_bootstrap(differences: Sequence[Mapping] | Mapping, resamples: int = 10_000, confidence: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """``differences``: per seed, a mapping prompt id -> (score of A - score of B) on that prompt (one mapping
    alone: one seed). The statistic is the mean over all pairs; each of ``resamples`` bootstrap samples draws
    the distinct prompts with replacement, each drawn prompt contributing its pairs of every seed; the interval
    is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the resampled means."""
    per_seed = [differences] if isinstance(differences, Mapping) else list(differences)
    sums: dict = {}
    counts: dict = {}
    for seed_pairs in per_seed:
        for prompt, value in seed_pairs.items():
            value = float(value)
            if not np.isfinite(value):
                raise ValueError(f"prompt {prompt!r}: the paired difference is {value}")
            sums[prompt] = sums.get(prompt, 0.0) + value
            counts[prompt] = counts.get(prompt, 0) + 1
    if not sums:
        raise ValueError("no paired differences to bootstrap")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    total, count = np.array(list(sums.values())), np.array(list(counts.values()), dtype=np.float64)
    rng, means = np.random.default_rng(seed), []
    block = max(1, 2_000_000 // len(total))  # draws held at once: a bounded memory for large test sets
    for start in range(0, resamples, block):
        draws = rng.integers(0, len(total), size=(min(block, resamples - start), len(total)))
        means.append(total[draws].sum(axis=1) / count[draws].sum(axis=1))
    means = np.concatenate(means)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(total.sum() / count.sum()), float(low), float(high), len(total),
                            int(count.sum()), confidence)


def mean_and_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1) of per-seed results; None for the std of one seed."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else None
