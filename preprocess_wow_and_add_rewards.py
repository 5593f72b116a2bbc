#!/usr/bin/env python
"""Wizard of Wikipedia / FaithDial -> rewarded records for wow, faithdial or faithdial_wow (``lolrl preprocess
wow``); see lolrl/tasks/paper/preprocess.py."""
import sys

from lolrl.tasks.paper.preprocess import dialogue_main

if __name__ == "__main__":
    sys.exit(dialogue_main())
