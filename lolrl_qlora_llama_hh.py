#!/usr/bin/env python
"""A-LoL and its baselines on HH (the original's script name): ``lolrl hh a-lol``, lolrl/tasks/hh/offline.py."""
import sys

from lolrl.tasks.hh.offline import alol_main

if __name__ == "__main__":
    sys.exit(alol_main())
