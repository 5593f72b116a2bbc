"""lolrl: offline RL for language models on data that already exists (A-LoL and its baselines).

Layers (a lower one never imports a higher one): ``utils`` < ``engine`` < ``online`` < ``tasks``, ``demo``.
``import lolrl`` is light: each public name below loads its module (and torch) on first use.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "ALGORITHMS": "lolrl.engine.losses", "compute_loss": "lolrl.engine.losses",
    "ConfigError": "lolrl.utils.errors", "UserError": "lolrl.utils.errors",
    "OfflineRLConfig": "lolrl.engine.config", "OfflineRLTrainer": "lolrl.engine.trainer",
    "DataError": "lolrl.engine.data", "Record": "lolrl.engine.data", "TaskData": "lolrl.engine.data",
    "load_jsonl": "lolrl.engine.data", "load_task_dir": "lolrl.engine.data",
    "GenerationSettings": "lolrl.engine.generation", "LoraSettings": "lolrl.engine.modeling",
    "load_reward": "lolrl.engine.rewards", "TaskInfo": "lolrl.engine.task",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lolrl' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
