#!/usr/bin/env python
"""DPO on Helpful-and-Harmless with a (Q)LoRA LLaMA, through TRL's DPOTrainer.

    python dpo_qlora_llama_hh.py --output_dir results/dpo            # reference = the starting adapter
    python dpo_qlora_llama_hh.py --reference_free --output_dir results/dpo_ref_free

Pairs: the two suffixes of each ``cleaner_train.json`` record, the higher-reward one chosen.
The reference is the starting adapter (a frozen copy on the same base; its log-probs are computed
once before training unless ``--ref_every_step``). Validation, best adapter (``OUTPUT/best_adapter``)
and defaults as the original: beta 0.1, batch 2 x 8 accumulation, lr 2e-4, 9000 steps, validation
every 900. QLoRA on CUDA, plain LoRA in fp32 without CUDA. Interrupted runs resume from
``OUTPUT/checkpoints``.
"""
import logging
import sys

from lolrl.tasks.hh.cli import DPOHHArguments, parse_hh
from lolrl.tasks.hh.dpo import train_dpo
from lolrl.tasks.hh.shared import (
    generation_settings,
    hh_postprocess,
    read_hh_files,
    validation_records,
    validation_reward,
)
from lolrl.utils.errors import UserError, report_user_error


def main(argv=None) -> int:
    args = parse_hh(DPOHHArguments, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(args)
        val = validation_records(args, dev_rows)
        val = val[: args.max_val_examples] if args.max_val_examples else val
        reward = validation_reward(args.reward, args.reward_model, args.per_device_eval_batch_size)
        result = train_dpo(args, train_rows, val, reward, hh_postprocess(args),
                           generation_settings(args.model_name))
    except UserError as exc:
        return report_user_error(exc)
    best = result["best_validation_reward"]
    print(f"{result['steps']} steps" + (f", best validation reward {best:.4f}" if best is not None else "")
          + f"; adapter in {args.output_dir}/best_adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
