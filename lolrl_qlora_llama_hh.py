#!/usr/bin/env python
"""A-LoL and its baselines on Helpful-and-Harmless with a (Q)LoRA LLaMA, the original's options.

    python lolrl_qlora_llama_hh.py --algorithm a_lol --sampling_strategy good_priority --output_dir results/a_lol

Training data: PRO-format ``{train_file_path}/cleaner_train.json`` (run data_cleaning.py first);
validation: ``sampled_dev.json``, generated greedily and scored by the 1.4B OpenAssistant reward
model; the best adapter by validation reward goes to ``OUTPUT/best_adapter``. 4-bit NF4 base on
CUDA; plain LoRA in fp32 without CUDA (it says so). One GPU is enough: the reference is the
starting adapter, whose log-probs are computed once before training.
"""
import sys

from lolrl.tasks.hh.cli import ALoLHHConfig, ALoLHHData, parse_hh, run_offline
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.train import task_data, validation_records


def build(data_args: ALoLHHData, config: ALoLHHConfig, train_rows, dev_rows):
    if config.algorithm.startswith("a_lol"):  # the original rescales the step budget by the positive-advantage share
        config.step_scale_rows = len(train_rows)
    train = pro_records(train_rows, data_args.prompt_format, config.train_candidates, "train")
    return task_data(train, validation_records(data_args, dev_rows, "mean" if config.value_source == "data" else "sft"))


def main(argv=None) -> int:
    return run_offline(*parse_hh((ALoLHHData, ALoLHHConfig), argv, __doc__), build)


if __name__ == "__main__":
    sys.exit(main())
