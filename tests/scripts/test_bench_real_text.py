"""bench/real_text.py end to end in its --quick mode (a scratch model) on the real HH files."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HH = Path(os.environ.get("LOLRL_HH_DIR", ROOT.parent / "shared" / "data" / "hh"))

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (HH / "hh_test" / "helpful_base.json").is_file(), reason=f"no HH data under {HH}")
def test_real_text_benchmark_quick_mode(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_text.py"), "--quick", "--output_dir", str(out),
                           "--hh_dir", str(HH), "--n_train", "8", "--n_val", "4", "--n_test", "4", "--seeds", "0,1",
                           "--runs", "nll,a_lol,a_lol+group", "--max_steps", "2"], capture_output=True, text=True,
                          timeout=600, env={"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin",
                                            "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = proc.stdout.strip().splitlines()
    assert table[-7].startswith("| run | seeds | final_reward | non_offensive | readability | sentiment | "
                                "diff vs nll [95% CI] | log-ratio/token | gold nll shift")
    names = [line.split(" | ")[0].strip("| ") for line in table[-5:]]
    assert names == ["start", "nll (reference)", "nll", "a_lol", "a_lol+group"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["algorithm"] for r in rows] == ["start", "nll (reference)", "nll", "nll", "a_lol", "a_lol",
                                              "a_lol+group", "a_lol+group"]
    assert rows[4]["value_r2"] != "" and all(0 <= float(r["final_reward"]) <= 3 for r in rows)
    intervals = {r["run"]: r for r in csv.DictReader((out / "intervals.csv").open())}
    # 2 seeds x 4 test prompts paired with nll's same seed; start and pi_ref with both of nll's seeds
    assert intervals["a_lol"]["pairs"] == intervals["start"]["pairs"] == "8" and intervals["nll"]["pairs"] == ""
    low, diff, high = (float(intervals["a_lol"][k]) for k in ("ci_low", "diff", "ci_high"))
    assert low <= diff <= high
    assert float(intervals["nll (reference)"]["logratio_per_token"]) == 0.0
    # the kept model is a trained one (no step-0 validation): it moved from pi_ref
    assert all(float(intervals[r]["gold_nll_shift"]) != 0.0 for r in ("nll", "a_lol", "a_lol+group"))
    assert (out / "runs" / "a_lol+group_seed0" / "advantage_stats.json").is_file()
    import json

    stats = json.loads((out / "runs" / "a_lol+group_seed0" / "advantage_stats.json").read_text())
    assert stats["estimates"] == {"group": 16, "value": 0}
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(train) == 16  # both responses of 8 prompts
