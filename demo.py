#!/usr/bin/env python
"""The offline demo (``lolrl demo``): python demo.py --output_dir runs/demo; see lolrl/demo/cli.py."""
import sys

from lolrl.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
