"""bench/gpu_check.sh in its CPU mode: one line per check, then the summary; GPU-only checks skip with a reason."""
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # it launches training runs (accelerate launch)

ROOT = Path(__file__).parents[2]


def test_gpu_check_script_cpu_mode(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LOLRL_WHEELS": str(tmp_path / "wheels")}
    (tmp_path / "wheels").mkdir()  # an empty wheel folder: every wheel is reported missing
    # throughput: bench/throughput.py's own
    checks = "qlora_paged,resume_plain,resume_fsdp,resume_zero3,packing_varlen,liger"
    proc = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), "--cpu", f"--only={checks}"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "wheel bitsandbytes: not in" in proc.stdout and "wheel deepspeed: not in" in proc.stdout
    found = {m[1]: (m[2], m[3]) for m in (re.match(r"CHECK (\S+) (PASS|FAIL|SKIP) (.+)", l) for l in lines) if m}
    assert list(found) == checks.split(",")
    assert found["resume_plain"][0] == "PASS" and "max |diff| 0.00e+00" in found["resume_plain"][1]
    for name in ("qlora_paged", "resume_fsdp", "resume_zero3", "packing_varlen", "liger"):
        assert found[name][0] == "SKIP" and found[name][1], name  # a reason on the line
    assert re.match(r"SUMMARY 1 passed, 0 failed, 5 skipped in \d+ s", lines[-1])


def test_gpu_check_script_refuses_a_missing_wheel_folder(tmp_path):
    proc = subprocess.run([str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "nowhere"), "--cpu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
