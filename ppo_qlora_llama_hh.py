#!/usr/bin/env python
"""Online PPO (or TRL's GRPO / RLOO) on HH (the original's script name): ``lolrl hh ppo``, lolrl/tasks/hh/online.py."""
import sys

from lolrl.tasks.hh.online import main

if __name__ == "__main__":
    sys.exit(main())
