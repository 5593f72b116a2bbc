"""The run's Accelerate set-up, shared by the offline trainer and PPO."""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from lolrl.utils.errors import ConfigError

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


def report_to_list(report_to: str | list[str] | None) -> list[str] | None:
    """``--report_to`` (comma-separated tracker names, or none; or TrainingArguments' list of them) as Accelerate's
    ``log_with``."""
    text = ",".join(report_to) if isinstance(report_to, (list, tuple)) else report_to
    names = [n.strip() for n in (text or "none").split(",") if n.strip()]
    return None if not names or names == ["none"] else names


def check_report_to(report_to: str | None) -> None:
    """Refuse, before anything loads, a tracker Accelerate does not know or whose package is missing
    (Accelerate would drop it without a word, and the run would log nowhere)."""
    names = report_to_list(report_to)
    if names is None:
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    available = {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name not in LoggerType.list() or name == "none":
            raise ConfigError(f"--report_to: unknown tracker '{name}' (expected none or a comma-separated list of "
                              f"{', '.join(LoggerType.list())})")
        if name != "all" and name not in available:
            raise ConfigError(f"--report_to {name}: its package is not installed (pip install {name}), so nothing "
                              "would be logged")


def has_accelerator_device() -> bool:
    """Whether torch sees a GPU (or another accelerator); without one a run says it is on the CPU (Accelerate's
    ``cpu=True``, TrainingArguments' ``use_cpu``)."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def make_accelerator(config, accumulation_steps: int = 1):
    """An ``Accelerator`` for a run's ``dtype``, ``report_to``, ``output_dir`` and ``seed`` (any trainer's config),
    told of the ``accumulation_steps`` micro-batches per optimizer step (DeepSpeed's engine scales and steps by it)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # A run's precision, accumulation and plugins are its own: Accelerate keeps them in a process-wide
    # singleton that refuses a second run with other settings in the same Python process (a notebook, a
    # sweep, the tests). transformers' TrainingArguments resets it for each run; so do we (the process
    # group and devices, in PartialState, stay).
    AcceleratorState._reset_state()
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.dtype]
    log_with = report_to_list(config.report_to)
    # Without a GPU, say so: then `accelerate launch --multi_gpu` / torchrun run several CPU processes (gloo).
    accelerator = Accelerator(cpu=not has_accelerator_device(), mixed_precision=mixed, log_with=log_with,
                              project_dir=config.output_dir, gradient_accumulation_steps=accumulation_steps)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != "FSDP":
        # Accelerate (1.15) selects FSDP only on accelerator devices; CPU processes then run plain DDP.
        logger.warning("FSDP was asked for but Accelerate runs %s here (FSDP needs GPUs): weights and optimizer "
                       "are replicated, not sharded", accelerator.distributed_type)
    set_seed(config.seed)
    return accelerator


def prepare_for_training(accelerator, model, optimizer, max_grad_norm: float | None, **kwargs):
    """``accelerator.prepare(model, optimizer)``; the learning-rate scheduler is NOT prepared (as in
    ``transformers.Trainer``): Accelerate's wrapper steps it once per process per optimizer step (it
    assumes the data loader's batch grew with the processes), which ran the schedule N times too fast.
    The caller builds it on the returned optimizer and steps it with :func:`step_scheduler`.

    Under DeepSpeed the engine clips inside its own step, by the config's ``gradient_clipping``
    (Accelerate fills ``auto`` with 1.0): it is set to ``max_grad_norm`` (0: none), and a config that
    gives another value is refused."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        clip = float(max_grad_norm or 0.0)
        given = ds_config.get("gradient_clipping", "auto")
        if given != "auto" and float(given) != clip:
            raise ConfigError(f"the DeepSpeed config clips gradients at {given} but --max_grad_norm is {clip}: "
                              "give gradient_clipping: auto (or the same value)")
        ds_config["gradient_clipping"] = clip
    return accelerator.prepare(model, optimizer, **kwargs)


def step_scheduler(accelerator, scheduler) -> None:
    """Advance the (unprepared) schedule by one optimizer step, unless that step was skipped (fp16 overflow)."""
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()


@contextlib.contextmanager
def micro_batch(accelerator, model, last: bool):
    """One micro-batch of an optimizer step, with Accelerate's accumulation state: gradients are
    reduced across processes only on the ``last`` one (``no_sync`` before it; under DeepSpeed the
    engine is told the boundary and steps, clipping included, only there), as ``transformers.Trainer``
    does. The group may be shorter than ``gradient_accumulation_steps`` (an epoch's last): the boundary
    is where the caller says, not a count. Call :func:`backward` inside; leaves ``sync_gradients``
    True on exit, so the optimizer's ``step`` and ``zero_grad`` act."""
    from accelerate.utils import DistributedType

    accelerator.gradient_state._set_sync_gradients(last)
    try:
        if last or accelerator.distributed_type == DistributedType.DEEPSPEED:
            yield
        else:
            with accelerator.no_sync(model):
                yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def backward(accelerator, loss, micro_batches: int) -> None:
    """Back-propagate ``loss / micro_batches`` (the optimizer step's mean over its micro-batches).
    ``accelerator.backward`` (or DeepSpeed's engine) divides by ``gradient_accumulation_steps``
    itself; the factor makes the division by ``micro_batches`` whatever that count is."""
    accelerator.backward(loss * (accelerator.gradient_accumulation_steps / micro_batches))


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
