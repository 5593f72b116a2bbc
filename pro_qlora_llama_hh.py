#!/usr/bin/env python
"""PRO (Preference Ranking Optimization) on Helpful-and-Harmless with a (Q)LoRA LLaMA.

    python pro_qlora_llama_hh.py --output_dir results/pro

Each training item is one prompt with its first ``--training_stage_num`` candidate responses; the
loss (``lolrl.engine.losses.pro_loss``) ranks them by their raw stored reward-model logits, using the
length-normalised log-probability of each, plus ``--sft_weight`` x the summed NLL of the
``sft_index`` response. Same engine, validation, best adapter and checkpoints as
``lolrl_qlora_llama_hh.py``. Differences from the original (documented in docs/hh.md): the
candidates are ranked by reward inside the loss (the original flipped the preference when a file
was not sorted) and the score counts exactly the response tokens (the original's mask was off by
one).
"""
import sys

from lolrl.tasks.hh.cli import PROHHArguments, parse_hh, run_offline
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.train import offline_config, task_data, validation_records


def build(args: PROHHArguments, train_rows, dev_rows):
    config = offline_config(args, algorithm="pro", group_size=args.training_stage_num, sft_weight=args.sft_weight,
                            sampling_strategy="uniform")
    train = pro_records(train_rows, args.prompt_format, "all", "train", sigmoid_rewards=False,
                        n_candidates=args.training_stage_num)
    return config, task_data(train, validation_records(args, dev_rows))


def main(argv=None) -> int:
    return run_offline(parse_hh(PROHHArguments, argv, __doc__), build)


if __name__ == "__main__":
    sys.exit(main())
