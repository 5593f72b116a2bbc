#!/usr/bin/env python
"""DPO on HH through TRL's DPOTrainer (the original's script name): ``lolrl hh dpo``, lolrl/tasks/hh/dpo.py."""
import sys

from lolrl.tasks.hh.dpo import main

if __name__ == "__main__":
    sys.exit(main())
