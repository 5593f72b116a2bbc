#!/usr/bin/env python
"""PRO on HH (the original's script name): ``lolrl hh pro``, lolrl/tasks/hh/offline.py."""
import sys

from lolrl.tasks.hh.offline import pro_main

if __name__ == "__main__":
    sys.exit(pro_main())
