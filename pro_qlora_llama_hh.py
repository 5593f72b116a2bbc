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

from lolrl.tasks.hh.cli import PROHHConfig, PROHHData, parse_hh, run_offline
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.train import task_data, validation_records


def build(data_args: PROHHData, config: PROHHConfig, train_rows, dev_rows):
    train = pro_records(train_rows, data_args.prompt_format, "all", "train", sigmoid_rewards=False,
                        n_candidates=config.group_size)
    return task_data(train, validation_records(data_args, dev_rows))


def main(argv=None) -> int:
    return run_offline(*parse_hh((PROHHData, PROHHConfig), argv, __doc__), build)


if __name__ == "__main__":
    sys.exit(main())
