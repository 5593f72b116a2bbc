#!/usr/bin/env python
"""Evaluate a (Q)LoRA adapter on the HH test splits (``lolrl hh eval``); see lolrl/tasks/hh/evaluate.py."""
import sys

from lolrl.tasks.hh.evaluate import adapter_main

if __name__ == "__main__":
    sys.exit(adapter_main())
