#!/usr/bin/env python
"""Train a language model on (prompt, response, reward) data with A-LoL or a baseline.

Example (see the README for the full workflow):
    python train_generation_task_with_off_policy_PG.py -i data/my_task -tn my_task --reward my_rewards:score \
        -m saved_models/my_task/nll -algo a_lol -s saved_models/my_task/a_lol -o outputs/my_task/a_lol -t -ev_b
"""
import sys

from lolrl.tasks.paper.cli import main

if __name__ == "__main__":
    sys.exit(main())
