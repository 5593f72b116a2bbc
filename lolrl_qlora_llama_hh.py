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
import sys

from lolrl.engine.config import ConfigError
from lolrl.engine.losses import ALGORITHMS
from lolrl.engine.sampling import STRATEGIES as SAMPLING_STRATEGIES
from lolrl.engine.sampling import canonical_strategy
from lolrl.tasks.hh.cli import add_common_arguments, run_offline
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.train import offline_config, task_data, validation_records

STRATEGIES = (*SAMPLING_STRATEGIES, "all_priority")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="nll")
    p.add_argument("--sampling_strategy", type=canonical_strategy, choices=STRATEGIES, default="uniform",
                   help="uniform (the original's None, also accepted), good_priority, good_random, or all_priority: "
                        "both suffixes of every record, each with its own reward")
    p.add_argument("--ppo_clip", type=lambda t: None if t.lower() in ("none", "null") else float(t), default=0.9,
                   help="importance-weight clip epsilon: 0 gives weight 1, none leaves the weight unclipped")
    p.add_argument("--kl_beta", type=float, default=0.0,
                   help="> 0 with --algorithm a_lol and --ppo_clip 0 is A-LoL KL (the original's spelling)")
    p.add_argument("--a2c_n_value_head_epochs", type=int, default=10)
    p.add_argument("--value_source", choices=("generations", "data"), default="generations",
                   help="V(x) fits the reward of the starting policy's generations on the dev prompts (the paper), "
                        "or the dev file's stored rewards of all its suffixes (no reward model at training time)")
    add_common_arguments(p, batch_size=4, accumulation=4)
    return p


def build(args, train_rows, dev_rows):
    algorithm, clip = args.algorithm, args.ppo_clip
    if args.kl_beta > 0:
        if algorithm not in ("a_lol", "a_lol_kl") or clip:
            raise ConfigError("--kl_beta > 0 means A-LoL KL: use it with --algorithm a_lol(_kl) and --ppo_clip 0")
        algorithm = "a_lol_kl"
    candidates = "all" if args.sampling_strategy == "all_priority" else "sft"
    config = offline_config(
        args, algorithm=algorithm, ppo_clip=clip if algorithm != "a_lol_kl" else None, ppo_clip_given=True,
        kl_beta=args.kl_beta if algorithm == "a_lol_kl" else None,
        sampling_strategy="good_priority" if candidates == "all" else args.sampling_strategy,
        # the original rescales the step budget by the positive-advantage share (A-LoL family only)
        step_scale_rows=len(train_rows) if algorithm.startswith("a_lol") else None,
        value_epochs=args.a2c_n_value_head_epochs, value_source=args.value_source)
    data = task_data(pro_records(train_rows, args.prompt_format, candidates, "train"),
                     validation_records(args, dev_rows, "all" if args.value_source == "data" else "sft"))
    return config, data


def main(argv=None) -> int:
    return run_offline(build_parser().parse_args(argv), build)


if __name__ == "__main__":
    sys.exit(main())
