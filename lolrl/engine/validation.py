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

from lolrl.engine.collation import TokenizedRow
from lolrl.engine.data import DataError, Record
from lolrl.engine.generation import GenerationSettings, generate, generate_with_prompt_states
from lolrl.engine.reports import summarize_generations
from lolrl.engine.rewards import RESERVED_COLUMNS
from lolrl.utils.finite import check_finite_model
from lolrl.utils.io import append_jsonl, atomic_write_json
from lolrl.utils.processes import decided_on_main

logger = logging.getLogger(__name__)


def reward_columns(records: list[Record]) -> dict[str, list]:
    """Extra record fields, passed to reward functions as TRL passes dataset columns."""
    keys: list[str] = []
    for record in records:
        keys += [k for k in record.meta if k not in keys]
        clash = next((k for k in record.meta if k in RESERVED_COLUMNS), None)
        if clash is not None:
            raise DataError("records", None, clash,
                            f"record {record.id!r}: a data column named '{clash}' collides with "
                            f"a keyword of the reward call ({', '.join(RESERVED_COLUMNS)}): rename it")
    columns = {k: [r.meta.get(k) for r in records] for k in keys}
    columns["ids"] = [r.id for r in records]
    columns["references"] = [r.response for r in records]
    return columns


def completion_text(completion) -> str:
    """A completion as plain text: a string as is, a conversational one its messages' contents."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def completions_for_reward(records: list[Record], completions: list) -> list:
    """Completions in the form of the records' own: text generated for a conversational row reaches the
    reward as TRL's GRPO passes it, ``[{"role": "assistant", "content": text}]``."""
    return [[{"role": "assistant", "content": c}] if r.is_chat_completion and isinstance(c, str) else c
            for r, c in zip(records, completions)]


def gold_texts(records: list[Record], markers: tuple[str | None, ...] = ()) -> list[str]:
    """The records' gold responses as text to compare generations with: every end marker (the task's,
    e.g. the paper tasks' ``<|endoftext|>``, which the original removed too, and the tokenizer's EOS
    text) removed, then stripped."""
    markers = [m for m in markers if m]
    texts = []
    for record in records:
        text = completion_text(record.response)
        for marker in markers:
            text = text.replace(marker, "")
        texts.append(text.strip())
    return texts


def score_on_main(reward, records: list[Record], completions: list[str], batch_size: int, accelerator,
                  desc: str) -> dict[str, list[float]]:
    """Score on the main process and share the result, so every process takes the same decisions."""
    result = [None]
    if accelerator.is_main_process:
        result = [reward(prompts=[r.prompt for r in records], completions=completions_for_reward(records, completions),
                         batch_size=batch_size,
                         desc=desc, **reward_columns(records))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(result)
    return result[0]


def scored_generations_check(n: int):
    """A cache check for ``{"completions": [n strings], "rewards": {name: [n numbers]}}`` (see Cache.load)."""
    def check(payload: dict, tensors: dict) -> None:
        completions, rewards = payload["completions"], payload["rewards"]
        if not (isinstance(completions, list) and len(completions) == n
                and all(isinstance(c, str) for c in completions)):
            raise TypeError(f"expected {n} completions (strings)")
        if not isinstance(rewards, dict) or "final_reward" not in rewards:
            raise TypeError("expected rewards by name, with final_reward")
        for name, values in rewards.items():
            if not (isinstance(values, list) and len(values) == n and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
                raise TypeError(f"expected {n} finite rewards for {name!r}")

    return check


def generate_and_score(model, tokenizer, records: list[Record], rows: list[TokenizedRow],
                       settings: GenerationSettings, batch_size: int, accelerator, reward=None, postprocess=None,
                       desc: str = "validation", prompt_states: list | None = None
                       ) -> tuple[list[str], dict[str, list[float]]]:
    """Completions for the records' prompts (post-processed) and their rewards (``{}`` without a reward).
    ``prompt_states``: a list, filled with each row's prompt states from the generation's own prefill
    (:func:`lolrl.engine.generation.generate_with_prompt_states`)."""
    if prompt_states is None:
        completions = generate(model, tokenizer, rows, settings, batch_size, accelerator, desc=f"{desc}: generate")
    else:
        completions, states = generate_with_prompt_states(model, tokenizer, rows, settings, batch_size, accelerator,
                                                          desc=f"{desc}: generate")
        prompt_states[:] = states
    if postprocess is not None:
        completions = [postprocess(c) for c in completions]
    rewards = score_on_main(reward, records, completions, batch_size, accelerator, f"{desc}: reward") \
        if reward is not None else {}
    return completions, rewards


class BestModelKeeper:
    """The one writer of validation results and of the best model, for every trainer (the offline
    trainer, PPO and the callback for TRL's trainers), so they all leave the same files:

    * ``OUTPUT/validation_stats.jsonl``: one line per validation, ``{"step", "epoch", "metric",
      "measure", <the summary's numbers>}``;
    * ``SAVE/best.json``: ``{"step", "epoch", "metric", "measure"}`` of the model saved in ``SAVE``.

    A non-finite measure never wins. ``best`` is the best measure so far (restored on resume).
    """

    def __init__(self, output_dir: str | Path, save_dir: str | Path, metric: str):
        self.output_dir, self.save_dir, self.metric = Path(output_dir), Path(save_dir), metric
        self.best = -math.inf

    def record(self, step: int, epoch: float | None, summary: dict, measure: float, save, accelerator) -> bool:
        """Log one validation and, when ``measure`` is a new best, call ``save()`` (on every process:
        gathering sharded weights is a collective) and write ``best.json``. Returns whether it improved."""
        improved = math.isfinite(measure) and measure > self.best
        entry = {"step": step, "epoch": epoch, "metric": self.metric, "measure": measure}
        if accelerator.is_main_process:
            append_jsonl(self.output_dir / "validation_stats.jsonl", {**entry, **summary})
        if improved:
            self.best = measure
            save()
            if accelerator.is_main_process:
                atomic_write_json(self.save_dir / "best.json", entry)
            accelerator.wait_for_everyone()
        if not math.isfinite(measure):
            logger.warning("step %d: validation %s is %s: not a candidate for the best model", step, self.metric,
                           measure)
        logger.info("step %d: validation %s = %.4f%s", step, self.metric, measure, " (new best)" if improved else "")
        accelerator.log({f"val/{self.metric}": measure}, step=step)
        return improved


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
        self.postprocess, self.eval_in_beginning = postprocess, eval_in_beginning
        self.adapter_name = adapter_name  # save only this adapter (TRL keeps a frozen "ref" copy beside it)
        self.keeper = BestModelKeeper(output_dir, save_dir, metric)
        self.trainer = None

    @property
    def best(self) -> float:
        return self.keeper.best

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
                                        golds=gold_texts(self.records, (self.tokenizer.eos_token,)))
        measure = summary[self.keeper.metric]

        def write():
            check_finite_model(accelerator.unwrap_model(model), f"the model for {self.save_dir}")
            kwargs = {"selected_adapters": [self.adapter_name]} if self.adapter_name else {}
            accelerator.unwrap_model(model).save_pretrained(self.save_dir, safe_serialization=True, **kwargs)
            self.tokenizer.save_pretrained(self.save_dir)

        def save():  # on every process; the main one writes, and its refusal stops them all
            decided_on_main(accelerator, write)

        self.keeper.record(step, epoch, summary, measure, save, accelerator)
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
