#!/usr/bin/env python
"""Wizard of Wikipedia / FaithDial -> rewarded records for wow, faithdial or faithdial_wow (-i).

See the README section of the task for the commands; the pipeline is in lolrl/tasks/paper/preprocess.py.
"""
import sys

from lolrl.tasks.paper.preprocess import dialogue_parser, preprocess_dialogue, run_main

if __name__ == "__main__":
    sys.exit(run_main(preprocess_dialogue, dialogue_parser(), None))
