"""Generate on prompts, score with the reward, and keep the best model: the validation every trainer shares.

The offline trainer, the DPO script (TRL's trainer plus :class:`RewardValidationCallback`) and
the PPO trainer validate the same way: greedy (or configured) generation of the records' prompts,
an optional text post-processing, the reward on the main process (shared with the others, so
every process takes the same decision), the mean of the task's metric as the measure.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .collation import TokenizedRow
from .data import Record
from .evaluation import summarize_generations
from .generation import GenerationSettings, generate
from .io import append_jsonl, atomic_write_json
from .paper_rewards import EOS as PAPER_EOS  # the end marker written into the paper tasks' references

logger = logging.getLogger(__name__)


def reward_columns(records: list[Record]) -> dict[str, list]:
    """Extra record fields, passed to reward functions as TRL passes dataset columns."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record.meta if k not in keys]
    columns = {k: [r.meta.get(k) for r in records] for k in keys}
    columns["ids"] = [r.id for r in records]
    columns["references"] = [r.response for r in records]
    return columns


def reference_texts(records: list[Record], eos_token: str | None = None) -> list[str]:
    """The records' gold responses as text to compare generations with: every ``<|endoftext|>`` (the
    original removed it too) and the tokenizer's EOS text removed, then stripped."""
    markers = [m for m in (PAPER_EOS, eos_token) if m]
    texts = []
    for record in records:
        text = record.response
        for marker in markers:
            text = text.replace(marker, "")
        texts.append(text.strip())
    return texts


def score_on_main(reward, records: list[Record], completions: list[str], batch_size: int, accelerator,
                  desc: str) -> dict[str, list[float]]:
    """Score on the main process and share the result, so every process takes the same decisions."""
    result = [None]
    if accelerator.is_main_process:
        result = [reward(prompts=[r.prompt for r in records], completions=completions, batch_size=batch_size,
                         desc=desc, **reward_columns(records))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(result)
    return result[0]


def generate_and_score(model, tokenizer, records: list[Record], rows: list[TokenizedRow],
                       settings: GenerationSettings, batch_size: int, accelerator, reward=None, postprocess=None,
                       desc: str = "validation") -> tuple[list[str], dict[str, list[float]]]:
    """Completions for the records' prompts (post-processed) and their rewards (``{}`` without a reward)."""
    completions = generate(model, tokenizer, rows, settings, batch_size, accelerator, desc=f"{desc}: generate")
    if postprocess is not None:
        completions = [postprocess(c) for c in completions]
    rewards = score_on_main(reward, records, completions, batch_size, accelerator, f"{desc}: reward") \
        if reward is not None else {}
    return completions, rewards


class RewardValidationCallback:
    """A ``transformers.TrainerCallback`` for trainers that are not ours (TRL's DPO): every
    ``eval_steps`` optimizer steps and at the end, generate on the validation records, score, log to
    ``OUTPUT/validation_stats.jsonl`` and save the model (its adapter) to ``save_dir`` when the
    measure improves. ``attach(trainer)`` before ``trainer.train()``.
    """

    def __init__(self, records: list[Record], rows: list[TokenizedRow], tokenizer, reward,
                 settings: GenerationSettings, batch_size: int, eval_steps: int, output_dir: str | Path,
                 save_dir: str | Path, metric: str = "final_reward", postprocess=None, eval_in_beginning=True,
                 adapter_name: str | None = None):
        self.records, self.rows, self.tokenizer, self.reward = records, rows, tokenizer, reward
        self.settings, self.batch_size, self.eval_steps = settings, batch_size, eval_steps
        self.output_dir, self.save_dir = Path(output_dir), Path(save_dir)
        self.metric, self.postprocess, self.eval_in_beginning = metric, postprocess, eval_in_beginning
        self.adapter_name = adapter_name  # save only this adapter (TRL keeps a frozen "ref" copy beside it)
        self.best = -math.inf
        self.trainer = None

    def attach(self, trainer) -> None:
        from transformers import TrainerCallback

        # The HF callback protocol by duck typing: subclassing here would import transformers at module load.
        self.trainer = trainer
        trainer.add_callback(_as_trainer_callback(self, TrainerCallback))

    def validate(self, model, step: int, epoch: float) -> float:
        accelerator = self.trainer.accelerator
        was_training = model.training
        model.eval()
        completions, rewards = generate_and_score(model, self.tokenizer, self.records, self.rows, self.settings,
                                                  self.batch_size, accelerator, self.reward, self.postprocess)
        summary = summarize_generations(completions, rewards,
                                        references=reference_texts(self.records, self.tokenizer.eos_token))
        measure = summary[self.metric]
        improved = measure > self.best
        if accelerator.is_main_process:
            append_jsonl(self.output_dir / "validation_stats.jsonl", {"step": step, "epoch": epoch, **summary})
        if improved:
            self.best = measure
            unwrapped = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                kwargs = {"selected_adapters": [self.adapter_name]} if self.adapter_name else {}
                unwrapped.save_pretrained(self.save_dir, safe_serialization=True, **kwargs)
                self.tokenizer.save_pretrained(self.save_dir)
                atomic_write_json(self.save_dir / "best.json", {"step": step, "measure": measure,
                                                                "metric": self.metric})
            accelerator.wait_for_everyone()
        logger.info("step %d: validation %s = %.4f%s", step, self.metric, measure, " (new best)" if improved else "")
        if was_training:
            model.train()
        return measure


def _as_trainer_callback(validator: RewardValidationCallback, base):
    class _Callback(base):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if validator.eval_in_beginning and state.global_step == 0:
                validator.validate(model, 0, 0.0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = validator.eval_steps
            if (every > 0 and state.global_step % every == 0) or state.global_step == state.max_steps:
                validator.validate(model, state.global_step, float(state.epoch or 0.0))

    return _Callback()
