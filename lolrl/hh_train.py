"""What the HH training scripts share: their common flags, data, reward, model settings and run.

``lolrl_qlora_llama_hh.py`` (the A-LoL family and baselines), ``pro_qlora_llama_hh.py`` (PRO,
on the same engine with groups of candidates) and ``dpo_qlora_llama_hh.py`` (TRL's DPO trainer)
are thin front ends over this module, so a flag means the same thing in each.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .config import ConfigError, OfflineRLConfig
from .data import DataError, TaskData
from .generation import GenerationSettings
from .hh import RENDERINGS, postprocess, pro_records, read_pro_file
from .modeling import LoraSettings, ModelLoadError
from .rewards import RewardFunction, RewardSpecError
from .sampling import NoPositiveRowsError

MAX_PROMPT_LENGTH, MAX_RESPONSE_LENGTH = 640, 128  # the original's limits (prompt left-truncated)
USER_ERRORS = (DataError, ConfigError, ModelLoadError, NoPositiveRowsError, RewardSpecError)


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


def adapter_of(args) -> str | None:
    return None if args.adapter_path in (None, "", "none", "None") else args.adapter_path


def read_hh_files(args) -> tuple[list[dict], list[dict]]:
    """The PRO-format training records (``cleaner_train.json``) and the validation records."""
    train = read_pro_file(Path(args.train_file_path) / "cleaner_train.json")
    return train[: args.max_train_examples] if args.max_train_examples else train, read_pro_file(args.eval_file_path)


def validation_records(args, dev_rows: list[dict], candidates: str = "sft"):
    return pro_records(dev_rows, args.prompt_format, candidates, "dev")


def hh_postprocess(args):
    anthropic = args.prompt_format == "anthropic"
    return lambda text: postprocess(text, anthropic)


def generation_settings(model_name: str) -> GenerationSettings:
    """Greedy, 128 new tokens, stop at EOS and at '###' (when it is one token), as the original validates."""
    from .hh_eval import stop_ids
    from .modeling import load_tokenizer

    return GenerationSettings(max_new_tokens=MAX_RESPONSE_LENGTH, num_beams=1, repetition_penalty=1.0,
                              stop_token_ids=stop_ids(load_tokenizer(model_name)))


def validation_reward(args) -> RewardFunction | None:
    """``--reward`` (a spec, or none), else the OpenAssistant-style ``--reward_model``."""
    from .hh_reward import TRAINING_RM, HHRewardModel
    from .rewards import load_reward

    if args.reward is not None:
        return None if args.reward.lower() == "none" else load_reward(args.reward)
    return RewardFunction.from_callables(
        {"reward": HHRewardModel(args.reward_model or TRAINING_RM, batch_size=args.per_device_eval_batch_size)})


def precision() -> dict:
    """QLoRA (NF4 base, bf16 compute) on CUDA; plain LoRA in fp32 elsewhere, and the log says so."""
    cuda = torch.cuda.is_available()
    if not cuda:
        logging.getLogger(__name__).warning("no CUDA device: plain LoRA on an fp32 base instead of 4-bit QLoRA")
    return {"dtype": "bf16" if cuda else "fp32", "load_in_4bit": cuda}


def offline_config(args, **settings) -> OfflineRLConfig:
    """The engine's configuration for an HH script: common flags plus the script's ``settings``."""
    return OfflineRLConfig(
        model_name=args.model_name_or_path, adapter_path=adapter_of(args), output_dir=args.output_dir,
        save_dir=str(Path(args.output_dir) / "best_adapter"), cache_dir=args.cache_dir, task_name="hh",
        max_prompt_length=args.max_prompt_length, max_resp_length=MAX_RESPONSE_LENGTH, n_epochs=0,
        max_steps=args.max_steps, eval_steps=args.eval_steps, batch_size=args.per_device_train_batch_size,
        accumulation_steps=args.gradient_accumulation_steps, val_batch_size=args.per_device_eval_batch_size,
        learning_rate=args.learning_rate, weight_decay=0.0, max_grad_norm=args.max_grad_norm,
        lr_scheduler=args.lr_scheduler_type, seed=args.seed, max_val_examples=args.max_val_examples,
        generation=generation_settings(args.model_name_or_path), eval_in_beginning=True,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout), do_test=False,
        stop_after_steps=args.stop_after_steps, gradient_checkpointing=args.gradient_checkpointing, **precision(),
        **settings)


def run_offline(args, build) -> int:
    """Read the data, build ``(config, TaskData)`` with ``build(args, train_rows, dev_rows)``, train on the
    engine with the HH validation reward; user errors end in one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(args)
        config, data = build(args, train_rows, dev_rows)
        from .trainer import OfflineRLTrainer

        trainer = OfflineRLTrainer(config, data, validation_reward(args), postprocess=hh_postprocess(args))
        results = trainer.run()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if results:
        reward = results["val/generated"].get("final_reward")
        print((f"validation reward of the best adapter: {reward:.4f}; " if reward is not None else "")
              + f"adapter in {config.save_dir}")
    return 0


def task_data(train, val) -> TaskData:
    return TaskData(train=train, val=val, test=None)
