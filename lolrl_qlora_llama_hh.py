#!/usr/bin/env python
"""A-LoL and its baselines on Helpful-and-Harmless with a (Q)LoRA LLaMA, the original's options.

    python lolrl_qlora_llama_hh.py --algorithm a_lol --sampling_strategy good_priority --output_dir results/a_lol

Training data: PRO-format ``{train_file_path}/cleaner_train.json`` (run data_cleaning.py first);
validation: ``sampled_dev.json``, generated greedily and scored by the 1.4B OpenAssistant reward
model; the best adapter by validation reward goes to ``OUTPUT/best_adapter``. 4-bit NF4 base on
CUDA; plain LoRA in fp32 without CUDA (it says so). One GPU is enough: the reference is the
starting adapter, whose log-probs are computed once before training.
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

from lolrl.config import ConfigError, OfflineRLConfig
from lolrl.data import DataError, TaskData
from lolrl.generation import GenerationSettings
from lolrl.hh import RENDERINGS, postprocess, pro_records, read_pro_file
from lolrl.losses import ALGORITHMS
from lolrl.modeling import LoraSettings, ModelLoadError
from lolrl.rewards import RewardFunction
from lolrl.sampling import NoPositiveRowsError

STRATEGIES = ("None", "good_priority", "good_random", "all_priority")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name_or_path", default="huggyllama/llama-7b")
    p.add_argument("--adapter_path", default="timdettmers/qlora-hh-rlhf-7b",
                   help="starting (and reference) adapter; 'none' trains a new LoRA adapter")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="nll")
    p.add_argument("--sampling_strategy", choices=STRATEGIES, default="None")
    p.add_argument("--ppo_clip", type=float, default=0.9)
    p.add_argument("--kl_beta", type=float, default=0.0,
                   help="> 0 with --algorithm a_lol and --ppo_clip 0 is A-LoL KL (the original's spelling)")
    p.add_argument("--a2c_n_value_head_epochs", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--max_grad_norm", type=float, default=0.3)
    p.add_argument("--lr_scheduler_type", default="constant")
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=4)
    p.add_argument("--per_device_eval_batch_size", type=int, default=16)
    p.add_argument("--max_steps", type=int, default=9000)
    p.add_argument("--eval_steps", type=int, default=900)
    p.add_argument("--train_file_path", default="data/hh_train_len2", help="folder with cleaner_train.json")
    p.add_argument("--eval_file_path", default="data/hh_dev/sampled_dev.json")
    p.add_argument("--output_dir", default="./results")
    p.add_argument("--cache_dir", default="cache/")
    p.add_argument("--seed", type=int, default=901)
    p.add_argument("--reward_model", default=None, help="training reward model (default the 1.4B OpenAssistant RM)")
    p.add_argument("--prompt_format", choices=RENDERINGS, default="llama")
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--max_val_examples", type=int, default=None)
    p.add_argument("--stop_after_steps", type=int, default=-1)
    return p


def hh_config(args, n_records: int) -> OfflineRLConfig:
    algorithm, clip = args.algorithm, args.ppo_clip
    if args.kl_beta > 0:
        if algorithm not in ("a_lol", "a_lol_kl") or clip:
            raise ConfigError("--kl_beta > 0 means A-LoL KL: use it with --algorithm a_lol(_kl) and --ppo_clip 0")
        algorithm = "a_lol_kl"
    sampling = "good_priority" if args.sampling_strategy == "all_priority" else args.sampling_strategy
    cuda = torch.cuda.is_available()
    adapter = None if args.adapter_path in ("", "none", "None") else args.adapter_path
    return OfflineRLConfig(
        model_name=args.model_name_or_path, adapter_path=adapter, output_dir=args.output_dir,
        save_dir=str(Path(args.output_dir) / "best_adapter"), cache_dir=args.cache_dir, algorithm=algorithm,
        task_name="hh", max_prompt_length=640, max_resp_length=128, n_epochs=0, max_steps=args.max_steps,
        eval_steps=args.eval_steps, batch_size=args.per_device_train_batch_size,
        accumulation_steps=args.gradient_accumulation_steps, val_batch_size=args.per_device_eval_batch_size,
        learning_rate=args.learning_rate, weight_decay=0.0, max_grad_norm=args.max_grad_norm,
        lr_scheduler=args.lr_scheduler_type, dtype="bf16" if cuda else "fp32", load_in_4bit=cuda, seed=args.seed,
        ppo_clip=clip if algorithm != "a_lol_kl" else None, ppo_clip_given=True,
        kl_beta=args.kl_beta if algorithm == "a_lol_kl" else None, sampling_strategy=sampling,
        # the original rescales the step budget by the positive-advantage share (A-LoL family only)
        step_scale_rows=n_records if algorithm.startswith("a_lol") else None,
        value_epochs=args.a2c_n_value_head_epochs, max_val_examples=args.max_val_examples,
        generation=GenerationSettings(max_new_tokens=128, num_beams=1, repetition_penalty=1.0),
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout), do_test=False,
        stop_after_steps=args.stop_after_steps)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows = read_pro_file(Path(args.train_file_path) / "cleaner_train.json")
        dev_rows = read_pro_file(args.eval_file_path)
        candidates = "all" if args.sampling_strategy == "all_priority" else "sft"  # all: each suffix, own reward
        data = TaskData(train=pro_records(train_rows, args.prompt_format, candidates, "train"),
                        val=pro_records(dev_rows, args.prompt_format, "sft", "dev"), test=None)
        config = hh_config(args, len(train_rows))
        from lolrl.hh_eval import stop_ids
        from lolrl.hh_reward import TRAINING_RM, HHRewardModel
        from lolrl.modeling import load_tokenizer
        from lolrl.trainer import OfflineRLTrainer

        config.generation.stop_token_ids = stop_ids(load_tokenizer(args.model_name_or_path))
        reward = RewardFunction.from_callables(
            {"reward": HHRewardModel(args.reward_model or TRAINING_RM, batch_size=args.per_device_eval_batch_size)})
        trainer = OfflineRLTrainer(config, data, reward,
                                   postprocess=lambda text: postprocess(text, args.prompt_format == "anthropic"))
        results = trainer.run()
    except (DataError, ConfigError, ModelLoadError, NoPositiveRowsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if results:
        print(f"validation reward of the best adapter: {results['val/generated']['final_reward']:.4f}; "
              f"adapter in {config.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
