"""The HH scripts' common command line and their run: flags every HH trainer has, with the original's
defaults, and user errors as one line with exit status 2."""
from __future__ import annotations

import argparse
import logging

from lolrl.tasks.hh.data import RENDERINGS
from lolrl.tasks.hh.train import MAX_PROMPT_LENGTH, hh_postprocess, read_hh_files, validation_reward
from lolrl.utils.errors import UserError, report_user_error


def add_common_arguments(p: argparse.ArgumentParser, *, batch_size: int, accumulation: int,
                         learning_rate: float = 2e-4, max_steps: int = 9000, eval_steps: int = 900) -> None:
    """The flags every HH trainer has, with the original's defaults (per script where they differ)."""
    p.add_argument("--model_name_or_path", default="huggyllama/llama-7b")
    p.add_argument("--adapter_path", default="timdettmers/qlora-hh-rlhf-7b",
                   help="starting (and reference) adapter; 'none' trains a new LoRA adapter")
    p.add_argument("--learning_rate", type=float, default=learning_rate)
    p.add_argument("--max_grad_norm", type=float, default=0.3)
    p.add_argument("--lr_scheduler_type", default="constant")
    p.add_argument("--per_device_train_batch_size", type=int, default=batch_size)
    p.add_argument("--gradient_accumulation_steps", type=int, default=accumulation)
    p.add_argument("--per_device_eval_batch_size", type=int, default=16)
    p.add_argument("--max_steps", type=int, default=max_steps)
    p.add_argument("--eval_steps", type=int, default=eval_steps)
    p.add_argument("--train_file_path", default="data/hh_train_len2", help="folder with cleaner_train.json")
    p.add_argument("--eval_file_path", default="data/hh_dev/sampled_dev.json")
    p.add_argument("--output_dir", default="./results")
    p.add_argument("--cache_dir", default="cache/")
    p.add_argument("--seed", type=int, default=901)
    p.add_argument("--reward_model", default=None,
                   help="validation reward model: OpenAssistant-style or any one-logit sequence classifier "
                        "(default the 1.4B OpenAssistant RM)")
    p.add_argument("--reward", default=None,
                   help="instead of --reward_model: any lolrl reward spec (module:fn, file.py:fn, hf:...), or "
                        "'none' to validate by the dev responses' NLL without generating")
    p.add_argument("--prompt_format", choices=RENDERINGS, default="llama",
                   help="llama: the original system line and ### turns; chat: the tokenizer's chat template")
    p.add_argument("--max_prompt_length", type=int, default=MAX_PROMPT_LENGTH,
                   help="prompt tokens kept (the last ones), 640 as the original")
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="trade compute for memory (off, as in the original)")
    p.add_argument("--max_train_examples", type=int, default=None, help="first N training records (quick runs)")
    p.add_argument("--max_val_examples", type=int, default=None)
    p.add_argument("--stop_after_steps", type=int, default=-1,
                   help="stop (checkpointed) after N optimizer steps; the same command resumes")


def run_offline(args, build) -> int:
    """Read the data, build ``(config, TaskData)`` with ``build(args, train_rows, dev_rows)``, train on the
    engine with the HH validation reward; user errors end in one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(args)
        config, data = build(args, train_rows, dev_rows)
        from lolrl.engine.trainer import OfflineRLTrainer

        trainer = OfflineRLTrainer(config, data, validation_reward(args), postprocess=hh_postprocess(args))
        results = trainer.run()
    except UserError as exc:
        return report_user_error(exc)
    if results:
        reward = results["val/generated"].get("final_reward")
        print((f"validation reward of the best adapter: {reward:.4f}; " if reward is not None else "")
              + f"adapter in {config.save_dir}")
    return 0
