#!/usr/bin/env python
"""Drop cut-off HH training records (``lolrl clean-hh``, the original's script name); see lolrl/tasks/hh/cleaning.py."""
import sys

from lolrl.tasks.hh.cleaning import main

if __name__ == "__main__":
    sys.exit(main())
