"""bench/throughput.py --quick runs end to end and prints its figures last (a smoke run, not a timing)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_throughput_quick_prints_its_figures(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--quick", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = {}
    for line in out.stdout.splitlines():
        if " = " in line:
            name, value = line.split(" = ", 1)
            figures[name] = float(value.split()[0])
    for name in ("ratio a_lol/nll", "ratio a_lol/original_style", "padding", "peak_memory a_lol/nll",
                 "value_stage/reference_pass"):
        assert name in figures and math.isfinite(figures[name]) and figures[name] > 0, name
    assert 1.0 <= figures["padding"] < 2.0
    assert out.stdout.strip().splitlines()[-1].startswith("value_stage/reference_pass")


@pytest.mark.slow
def test_throughput_takes_a_saved_model_and_checkpointing_for_every_method(tmp_path, tiny_models):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--quick", "--workdir",
                          str(tmp_path), "--model_path", tiny_models["llama"], "--methods", "nll,a_lol",
                          "--gradient_checkpointing", "on"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "model: llama (a saved causal LM)" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith(("nll ", "a_lol "))]
    assert len(rows) == 2 and all("gradient checkpointing" in line for line in rows), rows
