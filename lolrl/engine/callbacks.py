"""What lolrl adds to the ``transformers.Trainer`` loop, as callbacks and one optimizer guard.

* :class:`ValidationSchedule`: the original's schedule, ``val_log_frequency`` validations per epoch,
  evenly spaced, the last at the epoch's end (unless ``eval_strategy`` asks the Trainer's own), a
  validation at the last step, a checkpoint at every validation (``save_steps`` 0), and the
  sampler's epoch;
* :class:`StopAfterSteps`: stop, checkpointed, after ``stop_after_steps`` (a batch job's time limit);
* :class:`CheckpointSeal`: each checkpoint the Trainer writes gets the best model so far
  (``best.safetensors``), the run key and, last, a manifest of every file's size and SHA-256
  (:mod:`lolrl.utils.manifest`): a checkpoint without one (a run killed while saving) or that no
  longer matches it is never resumed;
* :func:`nonfinite_guarded`: an optimizer step with a non-finite loss or gradient is skipped, and
  ``max_nonfinite_steps`` in a row stop the run (:class:`lolrl.utils.finite.StepGuard`).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from transformers import TrainerCallback

from lolrl.utils.checkpoint import SEAL, inject_fault, read_seal
from lolrl.utils.finite import StepGuard
from lolrl.utils.io import atomic_write_json
from lolrl.utils.manifest import write_manifest
from lolrl.utils.processes import decided_on_main

logger = logging.getLogger(__name__)


class ValidationSchedule(TrainerCallback):
    """Validations (and checkpoints at them) on the original's schedule; the sampler's epoch."""

    def __init__(self, trainer=None):
        self.points: set[int] = set()
        self.per_epoch, self.total, self.epoch = 1, 0, 0
        self.trainer = trainer

    def plan(self, per_epoch: int, frequency: int, total: int) -> None:
        """``frequency`` validations per epoch of ``per_epoch`` optimizer steps (fewer if it is shorter)."""
        self.per_epoch, self.total = per_epoch, total
        self.points = {max(1, round(k * per_epoch / frequency)) for k in range(1, frequency + 1)}

    def on_train_begin(self, args, state, control, **kwargs):
        self.epoch = state.global_step // self.per_epoch - 1  # on_epoch_begin comes next

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.epoch += 1
        sampler = getattr(self.trainer, "sampler", None) if self.trainer else None
        if sampler is not None:
            sampler.set_epoch(self.epoch)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if args.eval_strategy == "no":
            in_epoch = step - (step - 1) // self.per_epoch * self.per_epoch
            if in_epoch in self.points or step >= self.total:
                control.should_evaluate = True
        elif step >= self.total:
            control.should_evaluate = True
        if control.should_evaluate:
            control.should_log = True  # the training window is logged at every validation too
            if args.checkpoint_at_validation:
                control.should_save = True
        return control


class StopAfterSteps(TrainerCallback):
    """``stop_after_steps``: a checkpoint, then the loop ends; the same command resumes."""

    def __init__(self):
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == args.stop_after_steps and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.stopped = True
        return control


class CheckpointSeal(TrainerCallback):
    """Seal each checkpoint (best model, run key, manifest last); restore the best model's state on resume."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.resumed: Path | None = None

    def resuming_from(self, checkpoint: Path) -> None:
        self.resumed = checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if self.resumed is not None:
            from safetensors.torch import load_file

            best = self.resumed / "best.safetensors"
            self.trainer.best_state = load_file(str(best)) if best.is_file() else None
            measure = read_seal(self.resumed)["best_measure"]
            self.trainer.keeper.best = -math.inf if measure is None else measure
            self.resumed = None

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_file

        trainer = self.trainer
        folder = trainer.checkpoint_dir / f"checkpoint-{state.global_step}"

        def seal() -> None:
            if trainer.best_state is not None:
                save_file({k: v.contiguous() for k, v in trainer.best_state.items()}, str(folder / "best.safetensors"))
            best = trainer.keeper.best
            atomic_write_json(folder / SEAL, {"run_key": trainer.run_key,
                                              "best_measure": best if math.isfinite(best) else None})
            inject_fault("before_manifest")
            write_manifest(folder)

        # every process has written its part of the checkpoint (its RNG state, its shard) before the manifest lists
        # the folder: without this barrier the main process could seal a checkpoint without another's RNG file
        if trainer.accelerator is not None:
            trainer.accelerator.wait_for_everyone()
        decided_on_main(trainer.accelerator, seal)
        inject_fault("after_checkpoint_save")
        return control


def nonfinite_guarded(optimizer, trainer) -> None:
    """Wrap ``optimizer.step`` (this instance's): the step's micro-batch losses and the gradients are checked
    on every process; a non-finite one skips the step on all of them, ``max_nonfinite_steps`` in a row
    raise :class:`lolrl.utils.finite.NonFiniteError` (a one-line error; the last checkpoint and the best
    model stay intact)."""
    guard = StepGuard(trainer.args.max_nonfinite_steps, trainer.accelerator, "training")
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        losses, trainer._step_losses = trainer._step_losses, []
        if guard.allow_step(losses, trainer.model, trainer.state.global_step + 1):
            return step(*args, **kwargs)
        optimizer.zero_grad()
        return None

    optimizer.step = guarded_step
