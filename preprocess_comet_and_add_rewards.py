#!/usr/bin/env python
"""ATOMIC-10x and ATOMIC-2020 -> rewarded records for COMET (``lolrl preprocess comet``); see
lolrl/tasks/paper/preprocess.py."""
import sys

from lolrl.tasks.paper.preprocess import comet_main

if __name__ == "__main__":
    sys.exit(comet_main())
