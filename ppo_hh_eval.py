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
import logging
import sys

from lolrl.tasks.hh.cli import PPOEvalArguments, parse_hh
from lolrl.tasks.hh.evaluate import run_test_evaluation

PROMPT_LIMIT = 384  # the original's 512 - 128
# The original evaluates this checkpoint with the GPT-NeoX-20B tokenizer (the checkpoint ships none).
TOKENIZER_OF = {"reciprocate/ppo_hh_neox-20B": "EleutherAI/gpt-neox-20b"}


def main(argv=None) -> int:
    args = parse_hh(PPOEvalArguments, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_test_evaluation(args, tokenizer_name=args.tokenizer_name or TOKENIZER_OF.get(args.model_name),
                               how="anthropic", max_prompt_length=PROMPT_LIMIT, stop_token_ids=[])


if __name__ == "__main__":
    sys.exit(main())
