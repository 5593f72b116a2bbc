"""bench/real_text.py end to end in its --quick mode (a scratch model) on the real HH files."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HH = ROOT.parent / "shared" / "data" / "hh"

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (HH / "hh_test" / "helpful_base.json").is_file(), reason=f"no HH data under {HH}")
def test_real_text_benchmark_quick_mode(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_text.py"), "--quick", "--output_dir", str(out),
                           "--n_train", "8", "--n_val", "4", "--n_test", "4", "--seeds", "0", "--extra", "",
                           "--max_steps", "2"], capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin",
                               "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.strip().splitlines()
    assert table[-7].startswith("| run | seeds | final_reward | non_offensive | readability | sentiment")
    names = [line.split(" | ")[0].strip("| ") for line in table[-5:]]
    assert names == ["start", "nll (reference)", "nll", "a_lol", "wbc"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["algorithm"] for r in rows] == ["start", "nll (reference)", "nll", "a_lol", "wbc"]
    assert rows[3]["value_r2"] != "" and all(0 <= float(r["final_reward"]) <= 3 for r in rows)
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(train) == 16  # both responses of 8 prompts
