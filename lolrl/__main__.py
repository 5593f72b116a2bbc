"""``python -m lolrl``: the ``lolrl`` command (lolrl/cli.py)."""
import sys

from lolrl.cli import main

sys.exit(main())
