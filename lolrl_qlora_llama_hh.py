#!/usr/bin/env python
"""A-LoL and its baselines on Helpful-and-Harmless with a (Q)LoRA LLaMA, the original's options.

    python lolrl_qlora_llama_hh.py --algorithm a_lol --sampling_strategy good_priority --output_dir results/a_lol

Training data: PRO-format ``{train_file_path}/cleaner_train.json`` (run data_cleaning.py first);
validation: ``sampled_dev.json``, generated greedily and scored by the 1.4B OpenAssistant reward
model; the best adapter by validation reward goes to ``OUTPUT/best_adapter``. 4-bit NF4 base on
CUDA; plain LoRA in fp32 without CUDA (it says so). One GPU is enough: the reference is the
starting adapter, whose log-probs are computed once before training.
"""
import logging
import sys

from lolrl.engine.sampling import canonical_strategy
from lolrl.tasks.hh.cli import ALoLHHArguments, check_kl_spelling, parse_hh, run_offline
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.train import offline_config, task_data, validation_records

logger = logging.getLogger("lolrl_qlora_llama_hh")


def build(args: ALoLHHArguments, train_rows, dev_rows):
    algorithm = check_kl_spelling(args)
    candidates = "all" if args.sampling_strategy == "all_priority" else "sft"
    kl = algorithm == "a_lol_kl"
    clip_given = not kl or "ppo_clip" in args.given_flags  # a_lol_kl: only a given clip (the engine refuses > 0)
    config = offline_config(
        args, algorithm=algorithm, ppo_clip=args.ppo_clip if clip_given else None, ppo_clip_given=clip_given,
        kl_beta=args.kl_beta if kl else None,  # None: the engine's default beta
        # the original's None (the default) is uniform sampling
        sampling_strategy="good_priority" if candidates == "all" else canonical_strategy(args.sampling_strategy),
        # the original rescales the step budget by the positive-advantage share (A-LoL family only)
        step_scale_rows=len(train_rows) if algorithm.startswith("a_lol") else None,
        value_epochs=args.a2c_n_value_head_epochs, value_source=args.value_source,
        value_samples=args.value_samples, value_head=args.value_head)
    if kl:
        logger.info("a_lol_kl: KL beta %g%s", config.kl_beta,
                    "" if args.kl_beta is not None else " (the engine's default; --kl_beta not given)")
    data = task_data(pro_records(train_rows, args.prompt_format, candidates, "train"),
                     validation_records(args, dev_rows, "mean" if args.value_source == "data" else "sft"))
    return config, data


def main(argv=None) -> int:
    return run_offline(parse_hh(ALoLHHArguments, argv, __doc__), build)


if __name__ == "__main__":
    sys.exit(main())
