#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with lolrl and everything its tests need.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -r requirements.txt
pip install -q -e . --no-deps
echo "ready: run '. .venv/bin/activate' first"
