#!/usr/bin/env python
"""Evaluate a (Q)LoRA adapter on the HH test splits, scored by the test reward model.

    python qlora_llama_hh_eval.py --adapter_path checkpoints/a_lol/best --output_dir outputs/hh_eval/a_lol

Greedy decoding (128 new tokens, stop at '###'), the original's prompt rendering and clean-up,
sigmoid of OpenAssistant's Pythia-6.9B reward model. Writes <split>_eval_results.jsonl per split,
hh_eval_results.{json,csv,md} (mean/std reward, distinct-1/2, mean length) and a plot.
4-bit NF4 on CUDA; on a machine without CUDA the base model loads in fp32 (and says so).
"""
import logging
import sys

from lolrl.tasks.hh.cli import HHEvalArguments, parse_hh
from lolrl.tasks.hh.evaluate import run_test_evaluation


def main(argv=None) -> int:
    args = parse_hh(HHEvalArguments, argv, __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapter = None if args.adapter_path in (None, "", "none") else args.adapter_path
    return run_test_evaluation(args, adapter_path=adapter, tokenizer_name=args.tokenizer_name, how=args.prompt_format)


if __name__ == "__main__":
    sys.exit(main())
