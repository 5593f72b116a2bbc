#!/usr/bin/env python
"""ATOMIC-10x and ATOMIC-2020 -> rewarded records for COMET.

See the README section of the task for the commands; the pipeline is in lolrl/tasks/paper/preprocess.py.
"""
import sys

from lolrl.tasks.paper.preprocess import comet_parser, preprocess_comet, run_main

if __name__ == "__main__":
    sys.exit(run_main(preprocess_comet, comet_parser(), None))
