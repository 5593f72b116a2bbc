"""DPO on HH through TRL's ``DPOTrainer``, with the library's data, models and validation.

.. math::
    \\mathcal L_{DPO} = -\\log\\sigma\\Big(\\beta\\big[(\\log\\pi_\\theta(y_c|x) - \\log\\pi_\\theta(y_r|x))
                       - (\\log\\pi_{ref}(y_c|x) - \\log\\pi_{ref}(y_r|x))\\big]\\Big)

with summed (not length-normalised) response log-probabilities including EOS, as the original.
The reference is the starting adapter: TRL copies it into a frozen ``ref`` adapter on the same
base model (no second base in memory) and, by default here, computes the reference log-probs once
before training. ``reference_free`` takes the reference log-ratio as 0 (the original's
``--reference_free``). The chosen response is the higher-reward suffix (``order="reward"``) or the
first one (``order="first"``, the original's ``suffix[0]``, which is the higher-reward one in
a reward-sorted training file).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from lolrl.engine.collation import Tokenizer
from lolrl.engine.modeling import load_model, load_tokenizer
from lolrl.engine.runtime import end_trainer_run
from lolrl.engine.validation import RewardValidationCallback
from lolrl.tasks.hh.data import render
from lolrl.tasks.hh.preference import PAIR_ORDERS, ordered_pair
from lolrl.utils.lock import check_output_paths, hold_folders
from lolrl.utils.processes import launched_as_main

logger = logging.getLogger(__name__)
__all__ = ["PAIR_ORDERS", "main", "preference_pairs", "train_dpo", "truncate_pairs"]

DPO_HELP = """DPO on Helpful-and-Harmless with a (Q)LoRA LLaMA, through TRL's DPOTrainer.

    lolrl hh dpo --output_dir results/dpo            # reference = the starting adapter
    lolrl hh dpo --reference_free --output_dir results/dpo_ref_free

Pairs: the two suffixes of each ``cleaner_train.json`` record, the higher-reward one chosen.
The reference is the starting adapter (a frozen copy on the same base; its log-probs are computed
once before training unless ``--ref_every_step``). Validation, best adapter (``OUTPUT/best_adapter``)
and defaults as the original: beta 0.1, batch 2 x 8 accumulation, lr 2e-4, 9000 steps, validation
every 900. QLoRA on CUDA, plain LoRA in fp32 without CUDA. Interrupted runs resume from
``OUTPUT/checkpoints``.
"""


def preference_pairs(rows: list[dict], how: str = "llama", order: str = "reward") -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` per PRO record (its first two suffixes); chat rendering
    gives TRL's conversational format. Records whose two rewards tie are skipped: no preference."""
    pairs = []
    for i, row in enumerate(rows):
        pair = ordered_pair(row, order, "train", i)
        if pair is None:
            continue
        a, b = pair
        prompt = render(row["prefix"][0], how)
        if how == "chat":
            a, b = [{"role": "assistant", "content": a}], [{"role": "assistant", "content": b}]
        pairs.append({"prompt": prompt, "chosen": a, "rejected": b})
    return pairs


def truncate_pairs(pairs: list[dict], tokenizer, max_prompt_length: int, max_response_length: int) -> list[dict]:
    """The original's limits on text pairs: prompts keep their last ``max_prompt_length`` tokens,
    responses their first ``max_response_length`` (TRL itself only truncates the whole sequence's
    end, which would cut responses of long prompts). Conversational pairs are left whole."""
    def cut(text: str, limit: int, keep_end: bool) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text
        return tokenizer.decode(ids[-limit:] if keep_end else ids[:limit])

    out = []
    for pair in pairs:
        if not isinstance(pair["prompt"], str):
            out.append(pair)
            continue
        out.append({"prompt": cut(pair["prompt"], max_prompt_length, True),
                    "chosen": cut(pair["chosen"], max_response_length, False),
                    "rejected": cut(pair["rejected"], max_response_length, False)})
    return out


def dpo_trainer_class(reference_free: bool):
    """TRL's ``DPOTrainer``, or a subclass whose reference log-probs are 0 (reference-free DPO)."""
    from trl import DPOTrainer

    if not reference_free:
        return DPOTrainer

    class ReferenceFreeDPOTrainer(DPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            zeros = torch.zeros(inputs["input_ids"].shape[0] // 2, device=self.accelerator.device)
            return zeros, zeros.clone()

    return ReferenceFreeDPOTrainer


def _stop_after(steps: int):
    """Stop (with a checkpoint) after ``steps`` optimizer steps; the same command resumes."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == steps:
                control.should_save = control.should_training_stop = True

    return StopAfter()


def train_dpo(data, config, train_rows: list[dict], val_records, reward, postprocess, generation) -> dict:
    """Train with TRL's DPO on the HH pairs, validating by reward every ``eval_steps`` steps;
    the best adapter goes to ``OUTPUT/best_adapter``. ``data`` and ``config``: the script's parsed settings
    (:class:`lolrl.tasks.hh.cli.DPOHHData`, :class:`lolrl.tasks.hh.cli.DPOHHConfig`, a ``trl.DPOConfig``);
    DPOTrainer gets the config, its checkpoints in ``OUTPUT/checkpoints``. The output folder is locked for the
    run (a second run on it is refused)."""
    check_output_paths({"output folder": config.output_dir}, str(Path(config.output_dir) / "best_adapter"),
                       {"starting model": config.model_name, "adapter": config.adapter_path})
    with hold_folders({"output folder": config.output_dir}, launched_as_main()):
        return _train_dpo(data, config, train_rows, val_records, reward, postprocess, generation)


def _train_dpo(data, config, train_rows: list[dict], val_records, reward, postprocess, generation) -> dict:
    from datasets import Dataset

    from lolrl.tasks.hh.shared import MAX_RESPONSE_LENGTH, precision

    output_dir = Path(config.output_dir)
    tokenizer = load_tokenizer(config.model_name)
    pairs = truncate_pairs(preference_pairs(train_rows, data.prompt_format, data.pair_order), tokenizer,
                           config.max_prompt_length, MAX_RESPONSE_LENGTH)
    logger.info("%d preference pairs from %d records", len(pairs), len(train_rows))
    model = load_model(config.model_name, **precision(config), adapter_path=config.adapter_path, lora=config.lora)
    args = dataclasses.replace(config, output_dir=str(output_dir / "checkpoints"))  # TRL's checkpoints go there
    trainer = dpo_trainer_class(config.reference_free)(
        model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    validator = None
    if reward is not None:
        rows = Tokenizer(tokenizer, False, config.max_prompt_length, MAX_RESPONSE_LENGTH)(val_records)
        validator = RewardValidationCallback(val_records, rows, tokenizer, reward, generation,
                                             config.per_device_eval_batch_size, config.eval_steps, output_dir,
                                             output_dir / "best_adapter", postprocess=postprocess,
                                             adapter_name="default")
        validator.attach(trainer)
    else:
        logger.warning("no reward: no validation by generation; the final adapter is saved as best_adapter")
    if config.stop_after_steps > 0:
        trainer.add_callback(_stop_after(config.stop_after_steps))
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=bool(checkpoints) or None)
    if validator is None and trainer.state.global_step == config.max_steps:
        if trainer.accelerator.is_main_process:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                output_dir / "best_adapter", selected_adapters=["default"], safe_serialization=True)
            tokenizer.save_pretrained(output_dir / "best_adapter")
        trainer.accelerator.wait_for_everyone()
    end_trainer_run(trainer)
    return {"best_validation_reward": validator.best if validator else None, "steps": trainer.state.global_step}


def main(argv: list[str] | None = None) -> int:
    """``lolrl hh dpo`` (``dpo_qlora_llama_hh.py``): parse straight into (DPOHHData, DPOHHConfig) and train."""
    from lolrl.tasks.hh.cli import DPOHHConfig, DPOHHData, parse_hh
    from lolrl.tasks.hh.shared import (
        generation_settings,
        hh_postprocess,
        read_hh_files,
        validation_records,
        validation_reward,
    )
    from lolrl.utils.errors import UserError, report_user_error

    data, config = parse_hh((DPOHHData, DPOHHConfig), argv, DPO_HELP)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(data)
        val = validation_records(data, dev_rows)
        val = val[: config.max_val_examples] if config.max_val_examples else val
        reward = validation_reward(config.reward, data.reward_model, config.per_device_eval_batch_size)
        result = train_dpo(data, config, train_rows, val, reward, hh_postprocess(data),
                           generation_settings(config.model_name))
    except UserError as exc:
        return report_user_error(exc)
    best = result["best_validation_reward"]
    print(f"{result['steps']} steps" + (f", best validation reward {best:.4f}" if best is not None else "")
          + f"; adapter in {config.output_dir}/best_adapter")
    return 0
