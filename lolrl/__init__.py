"""lolrl: offline RL for language models on data that already exists (A-LoL and its baselines)."""
from .config import ConfigError, OfflineRLConfig
from .data import DataError, Record, TaskData, load_jsonl, load_task_dir
from .generation import GenerationSettings
from .losses import ALGORITHMS, compute_loss
from .modeling import LoraSettings

__all__ = ["ALGORITHMS", "ConfigError", "DataError", "GenerationSettings", "LoraSettings", "OfflineRLConfig",
           "OfflineRLTrainer", "Record", "TaskData", "compute_loss", "load_jsonl", "load_reward", "load_task_dir"]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer and rewards import torch/transformers; keep `import lolrl` light for data checks.
    if name == "OfflineRLTrainer":
        from .trainer import OfflineRLTrainer

        return OfflineRLTrainer
    if name == "load_reward":
        from .rewards import load_reward

        return load_reward
    raise AttributeError(name)
