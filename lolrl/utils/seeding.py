"""Each stage its own seeded random stream, so results do not depend on which stages a cache skipped.

A stage (the reference generations, the value fit, a validation) runs inside :func:`stage_rng`:
the Python, NumPy and torch (CPU and current GPU) generators are seeded from ``(seed, stage)``
and restored afterwards, so whether the stage ran or its result came from a cache, the streams
outside it are the same. Training starts from :func:`seed_stage` ``(seed, "train")``.
"""
from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np


def stage_seed(seed: int, stage: str) -> int:
    """A 63-bit seed derived from the run's seed and the stage's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}".encode()).digest()[:8], "little") >> 1


def seed_stage(seed: int, stage: str) -> None:
    """Seed Python's, NumPy's and torch's global generators (every device) for ``stage``."""
    import torch

    value = stage_seed(seed, stage)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device


@contextlib.contextmanager
def stage_rng(seed: int, stage: str):
    """Run a block with generators seeded for ``stage``; the global states are restored afterwards."""
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        seed_stage(seed, stage)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
