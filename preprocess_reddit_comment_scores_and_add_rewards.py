#!/usr/bin/env python
"""Reddit comments (Kaggle CSVs) -> rewarded records for reddit_pos and reddit_neg (``lolrl preprocess reddit``);
see lolrl/tasks/paper/preprocess.py."""
import sys

from lolrl.tasks.paper.preprocess import reddit_main

if __name__ == "__main__":
    sys.exit(reddit_main())
