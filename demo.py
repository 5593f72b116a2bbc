#!/usr/bin/env python
"""The whole A-LoL pipeline offline, in minutes: python demo.py --output_dir runs/demo

Builds the embedded task (short dialogues, half of the training responses poor), a tiny model
trained from scratch (or SmolLM2-135M with --model smollm2), the NLL reference, then A-LoL and
the baselines, and writes results.csv and rewards.png.
"""
import argparse
import logging
import os
import sys

from lolrl.demo.pipeline import DemoSettings, parse_variant, run_demo
from lolrl.engine.losses import ALGORITHMS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--algorithms", default="a_lol,wbc",
                        help=f"comma-separated, from {','.join(a for a in ALGORITHMS if a != 'nll')}; NAME+kK fits "
                             "V(x) to the mean reward of K samples per validation prompt (e.g. a_lol+k4)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--n_train", type=int, default=None, help="training rows (default per model)")
    parser.add_argument("--max_steps", type=int, default=None, help="cap optimizer steps per run (quick runs)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = DemoSettings.smollm2() if args.model == "smollm2" else DemoSettings()
    if args.n_train:
        settings.n_train = args.n_train
    if args.max_steps:
        settings.max_steps = args.max_steps
    algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = [a for a in algorithms if parse_variant(a)[0] not in ALGORITHMS or a == "nll"]
    if unknown:
        parser.error(f"unknown algorithm(s) {unknown}; choose from {[a for a in ALGORITHMS if a != 'nll']}")
    run_demo(args.output_dir, algorithms, [int(s) for s in args.seeds.split(",")], settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
