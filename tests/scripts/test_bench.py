"""bench/throughput.py --quick runs end to end and prints its figures last (a smoke run, not a timing); its
CPU memory measure (bench/live_bytes.c) counts what a process holds."""
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(name: str):
    """The module bench/<name>.py (bench/ is a folder of scripts beside the package, not on the path)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(ROOT))


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
                 "value_stage/reference_pass", "value_stage/reference_pass (--value_source data)"):
        assert name in figures and math.isfinite(figures[name]) and figures[name] > 0, name
    assert 1.0 <= figures["padding"] < 2.0
    assert out.stdout.strip().splitlines()[-1].startswith("value_stage/reference_pass")
    # bench/gpu_check.py's throughput check reads this table (its pattern once fell out of step with it)
    table = bench("gpu_check").throughput_figures(out.stdout)
    assert set(table) == {"nll", "a_lol", "original_style"}, out.stdout[-3000:]
    assert all(float(f["tokens_s"]) > 0 and int(f["peak_mb"]) > 0 and f["mfu"] is None for f in table.values())
    if shutil.which(os.environ.get("CC", "cc")):  # the workers' peak is their live heap, the RSS beside it
        said = "peak memory on a CPU: live heap bytes (bench/live_bytes.c)"
        assert any(line.startswith("data: ") and line.endswith(said) for line in out.stdout.splitlines()), \
            out.stdout[:2000]
        rows = [line for line in out.stdout.splitlines() if line.startswith(("nll ", "a_lol "))]
        assert len(rows) == 2 and all(re.search(r"\(live heap; the timed steps \d+ MB; peak RSS \d+ MB\)", line)
                                      for line in rows), rows


HOLD = """
import json, sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[1])
from bench.throughput import live_heap_peak_mb
import ctypes
now = ctypes.CDLL(None).live_bytes_now
now.restype = ctypes.c_longlong
seen = {"start": now() / 2 ** 20, "start_peak": live_heap_peak_mb()}
held = torch.ones(64 * 2 ** 20, dtype=torch.uint8)  # 64 MiB through posix_memalign
grown = np.zeros(8 * 2 ** 20, dtype=np.uint8)  # 8 MiB through malloc/calloc
grown.resize(24 * 2 ** 20, refcheck=False)  # realloc to 24 MiB
seen["held"] = now() / 2 ** 20
del held, grown
seen["freed"] = now() / 2 ** 20
seen["peak"] = live_heap_peak_mb(reset=True)  # the peak so far; a new one starts from what is in use now
seen["restarted"] = live_heap_peak_mb()
brief = torch.ones(16 * 2 ** 20, dtype=torch.uint8)
del brief
seen["brief_peak"] = live_heap_peak_mb()
seen["end"] = now() / 2 ** 20
print(json.dumps(seen))
"""


def test_live_bytes_counter_counts_what_is_held_and_freed(tmp_path):
    if not shutil.which(os.environ.get("CC", "cc")):
        pytest.skip("no C compiler: bench/throughput.py measures the peak RSS instead, and says so")
    library, measure = bench("throughput").build_live_bytes_counter(tmp_path)
    assert library and measure.startswith("live heap"), measure
    env = os.environ | {"LD_PRELOAD": library}
    out = subprocess.run([sys.executable, "-c", HOLD, str(ROOT)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout)
    assert 64 + 24 <= seen["held"] - seen["start"] < 64 + 24 + 4, seen
    assert abs(seen["freed"] - seen["start"]) < 1, seen
    assert seen["peak"] >= seen["held"] and seen["start_peak"] >= seen["start"], seen
    assert abs(seen["restarted"] - seen["freed"]) < 1, seen
    assert 15.9 <= seen["brief_peak"] - seen["end"] < 17, seen  # 16 MiB, give or take a few small objects
    # without the library preloaded there is no live-heap figure (the benchmark then reports the RSS)
    plain = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from bench.throughput import live_heap_peak_mb; print(live_heap_peak_mb())", str(ROOT)],
                           capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip() == "None", plain.stderr[-2000:]


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


def test_gpu_table_gives_mfu_that_gpu_check_reads(capsys):
    """On a GPU the table gives each method's MFU (6 x parameters per real token over the card's bf16 peak),
    and bench/gpu_check.py's throughput check reads it."""
    methods = ["nll", "a_lol", "original_style"]
    per_round = {m: [{"real_tokens": 1000 * (i + 1), "seconds": 1.0, "fed_tokens": 1100 * (i + 1), "steps": 3,
                      "cpu_seconds": 1.9, "minor_faults": 30_000} for i in range(3)] for m in methods}
    final = {"device": "NVIDIA H100 80GB HBM3", "params": 10 ** 9, "layout": "length-grouped", "peak_memory_mb": 5000.0,
             "memory_measure": "CUDA max allocated", "peak_rss_mb": 3000.0}
    finals = {m: dict(final) for m in methods}
    finals["a_lol"] |= {"reference_pass_s": 10.0, "reference_rows": 64, "value_stage_s": 2.0, "prompt_states_s": 1.0,
                        "value_fit_s": 1.0}
    assert bench("throughput").report(methods, per_round, finals) == 0
    printed = capsys.readouterr().out
    table = bench("gpu_check").throughput_figures(printed)
    assert all("CPU 1.90x wall, 10K page faults a step" in line for line in printed.splitlines()
               if line.startswith(tuple(methods))), printed
    # median 2000 real tokens/s x 6 x 1e9 FLOPs over 989 TFLOP/s
    assert {m: f["mfu"] for m, f in table.items()} == {m: f"{2000 * 6e9 / 989e12:.1%}" for m in methods}
    assert all(f["peak_mb"] == "5000" and float(f["tokens_s"]) == 2000 for f in table.values())
