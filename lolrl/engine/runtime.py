"""The run's Accelerate set-up, shared by the offline trainer and PPO."""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def flat_config(config: dict, prefix: str = "") -> dict:
    """Trackers take flat scalars: nested settings become ``generation.num_beams`` etc."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def make_accelerator(config):
    """An ``Accelerator`` for a run's ``dtype``, ``report_to``, ``output_dir`` and ``seed`` (any trainer's config)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.dtype]
    log_with = None if config.report_to in (None, "none") else config.report_to.split(",")
    # Without a GPU, say so: then `accelerate launch --multi_gpu` / torchrun run several CPU processes (gloo).
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(cpu=not has_device, mixed_precision=mixed, log_with=log_with,
                              project_dir=config.output_dir)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != "FSDP":
        # Accelerate (1.15) selects FSDP only on accelerator devices; CPU processes then run plain DDP.
        logger.warning("FSDP was asked for but Accelerate runs %s here (FSDP needs GPUs): weights and optimizer "
                       "are replicated, not sharded", accelerator.distributed_type)
    set_seed(config.seed)
    return accelerator


def end_run(accelerator) -> None:
    """Close the trackers and, with several processes, the process group, without the teardown hang.
    The caller drops its wrapped model first (``model = accelerator.unwrap_model(model)``).

    Left to the interpreter, a two-process gloo run hung at exit (1 of 8 runs in a loop on a loaded
    machine): the last reference to the process group went with the DDP reducer, whose destructor
    runs holding the GIL and waits for gloo's worker threads, one of which was still releasing the
    tensors of the last broadcast and needed the GIL for it (pytorch/pytorch#56297). So: a barrier
    (every collective finished), the wrappers released while the process group is still registered,
    then the process group destroyed from Python (whose destructor lets go of the GIL)."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        accelerator.free_memory()  # Accelerate's own references to the prepared (wrapped) objects, and a gc
    accelerator.end_training()


def end_trainer_run(trainer) -> None:
    """:func:`end_run` for a ``transformers``/TRL ``Trainer`` (DPO, GRPO, RLOO): its wrapped model
    goes first."""
    trainer.model_wrapped = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    end_run(trainer.accelerator)
