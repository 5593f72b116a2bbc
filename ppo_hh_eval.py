#!/usr/bin/env python
"""Evaluate a full causal LM on the HH test splits (``lolrl hh eval-full-model``); see lolrl/tasks/hh/evaluate.py."""
import sys

from lolrl.tasks.hh.evaluate import full_model_main

if __name__ == "__main__":
    sys.exit(full_model_main())
