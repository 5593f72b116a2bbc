#!/usr/bin/env python
"""PRO (Preference Ranking Optimization) on Helpful-and-Harmless with a (Q)LoRA LLaMA.

    python pro_qlora_llama_hh.py --output_dir results/pro

Each training item is one prompt with its first ``--training_stage`` candidate responses; the
loss (``lolrl.engine.losses.pro_loss``) ranks them by their raw stored reward-model logits, using the
length-normalised log-probability of each, plus ``--sft_weight`` x the summed NLL of the
``sft_index`` response. Same engine, validation, best adapter and checkpoints as
``lolrl_qlora_llama_hh.py``. Differences from the original (documented in docs/hh.md): the
candidates are ranked by reward inside the loss (the original flipped the preference when a file
was not sorted) and the score counts exactly the response tokens (the original's mask was off by
one).
"""
import argparse
import sys

from lolrl.tasks.hh.cli import add_common_arguments, run_offline
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.train import offline_config, task_data, validation_records


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_weight", type=float, default=0.05, help="weight of the SFT term, times (stages-1)^2")
    p.add_argument("--training_stage", type=int, default=2, help="candidates per prompt (the original: 2)")
    add_common_arguments(p, batch_size=2, accumulation=8)
    return p


def build(args, train_rows, dev_rows):
    config = offline_config(args, algorithm="pro", group_size=args.training_stage, sft_weight=args.sft_weight,
                            sampling_strategy="uniform")
    train = pro_records(train_rows, args.prompt_format, "all", "train", sigmoid_rewards=False,
                        n_candidates=args.training_stage)
    return config, task_data(train, validation_records(args, dev_rows))


def main(argv=None) -> int:
    return run_offline(build_parser().parse_args(argv), build)


if __name__ == "__main__":
    sys.exit(main())
