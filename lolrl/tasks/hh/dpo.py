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

import logging
from pathlib import Path

import torch

from lolrl.engine.collation import Tokenizer
from lolrl.engine.modeling import load_model, load_tokenizer
from lolrl.engine.optim import resolve as resolve_optimizer
from lolrl.engine.runtime import end_trainer_run
from lolrl.engine.validation import RewardValidationCallback
from lolrl.tasks.hh.data import render
from lolrl.tasks.hh.preference import PAIR_ORDERS, ordered_pair
from lolrl.utils.lock import check_output_paths, hold_folders
from lolrl.utils.processes import launched_as_main

logger = logging.getLogger(__name__)
__all__ = ["PAIR_ORDERS", "preference_pairs", "train_dpo", "truncate_pairs"]


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


def train_dpo(args, train_rows: list[dict], val_records, reward, postprocess, generation) -> dict:
    """Train with TRL's DPO on the HH pairs, validating by reward every ``eval_steps`` steps;
    the best adapter goes to ``OUTPUT/best_adapter``. ``args``: the script's settings
    (:class:`lolrl.tasks.hh.cli.DPOHHArguments`). The output
    folder is locked for the run (a second run on it is refused)."""
    from lolrl.tasks.hh.shared import adapter_of

    check_output_paths({"output folder": args.output_dir}, str(Path(args.output_dir) / "best_adapter"),
                       {"starting model": args.model_name, "adapter": adapter_of(args)})
    with hold_folders({"output folder": args.output_dir}, launched_as_main()):
        return _train_dpo(args, train_rows, val_records, reward, postprocess, generation)


def _train_dpo(args, train_rows: list[dict], val_records, reward, postprocess, generation) -> dict:
    from datasets import Dataset
    from trl import DPOConfig

    from lolrl.tasks.hh.shared import MAX_RESPONSE_LENGTH, adapter_of, precision

    output_dir = Path(args.output_dir)
    tokenizer = load_tokenizer(args.model_name)
    pairs = truncate_pairs(preference_pairs(train_rows, args.prompt_format, args.pair_order), tokenizer,
                           args.max_prompt_length, MAX_RESPONSE_LENGTH)
    logger.info("%d preference pairs from %d records", len(pairs), len(train_rows))
    model = load_model(args.model_name, **precision(args), adapter_path=adapter_of(args),
                       lora=args.lora)
    cuda = torch.cuda.is_available()
    config = DPOConfig(
        output_dir=str(output_dir / "checkpoints"), per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type, max_grad_norm=args.max_grad_norm, max_steps=args.max_steps,
        optim=resolve_optimizer(args.optim), adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon, weight_decay=args.weight_decay,
        beta=args.beta, loss_type=[args.loss_type], max_length=None, seed=args.seed, bf16=cuda,
        precompute_ref_log_probs=not args.reference_free and not args.ref_every_step,
        precompute_ref_batch_size=args.per_device_eval_batch_size, logging_steps=args.logging_steps,
        save_strategy="steps", save_steps=args.eval_steps if args.eval_steps > 0 else 500, save_total_limit=2,
        report_to=args.report_to, disable_dropout=args.disable_dropout,
        gradient_checkpointing=args.activation_checkpointing,
        use_cpu=not cuda, remove_unused_columns=False)
    trainer = dpo_trainer_class(args.reference_free)(
        model=model, args=config, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    validator = None
    if reward is not None:
        rows = Tokenizer(tokenizer, False, args.max_prompt_length, MAX_RESPONSE_LENGTH)(val_records)
        validator = RewardValidationCallback(val_records, rows, tokenizer, reward, generation,
                                             args.per_device_eval_batch_size, args.eval_steps, output_dir,
                                             output_dir / "best_adapter", postprocess=postprocess,
                                             adapter_name="default")
        validator.attach(trainer)
    else:
        logger.warning("no reward: no validation by generation; the final adapter is saved as best_adapter")
    if args.stop_after_steps > 0:
        trainer.add_callback(_stop_after(args.stop_after_steps))
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=bool(checkpoints) or None)
    if validator is None and trainer.state.global_step == args.max_steps:
        if trainer.accelerator.is_main_process:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(
                output_dir / "best_adapter", selected_adapters=["default"], safe_serialization=True)
            tokenizer.save_pretrained(output_dir / "best_adapter")
        trainer.accelerator.wait_for_everyone()
    end_trainer_run(trainer)
    return {"best_validation_reward": validator.best if validator else None, "steps": trainer.state.global_step}
