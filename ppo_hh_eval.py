#!/usr/bin/env python
"""Evaluate a full (non-adapter) causal LM, e.g. a released PPO checkpoint, on the HH test splits.

    python ppo_hh_eval.py --model_name_or_path reciprocate/ppo_hh_pythia-6B --output_dir outputs/hh_eval/ppo_pythia

As the original ``ppo_hh_eval.py``: prompts in the Anthropic format (``Human: ... Assistant:``,
no system line), left-truncated to 384 tokens, greedy decoding of 128 new tokens stopping at EOS
only, the clean-up that also cuts at the next ``Assistant:`` turn, scored by the 6.9B
OpenAssistant test reward model. The same evaluation code and outputs as qlora_llama_hh_eval.py:
<split>_eval_results.jsonl per split, hh_eval_results.{json,csv,md} and a plot.
4-bit NF4 on CUDA; fp32 on a machine without CUDA (it says so).
"""
import argparse
import logging
import sys

from lolrl.tasks.hh.evaluate import run_test_evaluation
from lolrl.tasks.hh.reward_model import TEST_RM

PROMPT_LIMIT = 384  # the original's 512 - 128
# The original evaluates this checkpoint with the GPT-NeoX-20B tokenizer (the checkpoint ships none).
TOKENIZER_OF = {"reciprocate/ppo_hh_neox-20B": "EleutherAI/gpt-neox-20b"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="reciprocate/ppo_hh_pythia-6B", help="a full causal LM")
    parser.add_argument("--tokenizer_name", default=None, help="default: the model's own (GPT-NeoX-20B's for "
                                                               "reciprocate/ppo_hh_neox-20B)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--test_dir", default="data/hh_test")
    parser.add_argument("--reward_model", default=TEST_RM, help="OpenAssistant Pythia reward model (path or hub id)")
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--rm_batch_size", type=int, default=4)
    parser.add_argument("--exclude_bad_indices", action="store_true",
                        help="skip the records listed in bad_test_indices.json (dev overlap and others)")
    parser.add_argument("--max_examples", type=int, default=None, help="per split, for quick checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_test_evaluation(args, tokenizer_name=args.tokenizer_name or TOKENIZER_OF.get(args.model_name_or_path),
                               how="anthropic", max_prompt_length=PROMPT_LIMIT, stop_token_ids=[])


if __name__ == "__main__":
    sys.exit(main())
