#!/usr/bin/env python
"""Evaluate a (Q)LoRA adapter on the HH test splits, scored by the test reward model.

    python qlora_llama_hh_eval.py --adapter_path checkpoints/a_lol/best --output_dir outputs/hh_eval/a_lol

Greedy decoding (128 new tokens, stop at '###'), the original's prompt rendering and clean-up,
sigmoid of OpenAssistant's Pythia-6.9B reward model. Writes <split>_eval_results.jsonl per split,
hh_eval_results.{json,csv,md} (mean/std reward, distinct-1/2, mean length) and a plot.
4-bit NF4 on CUDA; on a machine without CUDA the base model loads in fp32 (and says so).
"""
import argparse
import logging
import sys

from lolrl.tasks.hh.data import RENDERINGS
from lolrl.tasks.hh.evaluate import run_test_evaluation
from lolrl.tasks.hh.reward_model import TEST_RM


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="huggyllama/llama-7b", help="base model")
    parser.add_argument("--adapter_path", default="timdettmers/qlora-hh-rlhf-7b", help="'none' for the base alone")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--test_dir", default="data/hh_test")
    parser.add_argument("--reward_model", default=TEST_RM, help="OpenAssistant Pythia reward model (path or hub id)")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--rm_batch_size", type=int, default=4)
    parser.add_argument("--prompt_format", choices=RENDERINGS, default="llama",
                        help="llama: the original system line and ### turns; chat: the tokenizer's chat template")
    parser.add_argument("--exclude_bad_indices", action="store_true",
                        help="skip the records listed in bad_test_indices.json (dev overlap and others)")
    parser.add_argument("--max_examples", type=int, default=None, help="per split, for quick checks")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapter = None if args.adapter_path in (None, "", "none") else args.adapter_path
    return run_test_evaluation(args, adapter_path=adapter, how=args.prompt_format)


if __name__ == "__main__":
    sys.exit(main())
