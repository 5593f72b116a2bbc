#!/usr/bin/env python
"""Reddit upvoted / downvoted comments (Kaggle CSVs) -> rewarded records for reddit_pos and reddit_neg.

See the README section of the task for the commands; the pipeline is in lolrl/tasks/paper/preprocess.py.
"""
import sys

from lolrl.tasks.paper.preprocess import preprocess_reddit, reddit_parser, run_main

if __name__ == "__main__":
    sys.exit(run_main(preprocess_reddit, reddit_parser(), None))
