#!/usr/bin/env python
r"""Collect every run of a task into a CSV (the paper's columns) and a markdown table; see lolrl/aggregate.py.

    python aggregate_generation_task_results.py -bmps "{'dgpt_nll': True}" -tn reddit_pos \
        -o final_results/reddit_pos_final_results.csv
"""
import sys

from lolrl.tasks.paper.aggregate import main

if __name__ == "__main__":
    sys.exit(main())
