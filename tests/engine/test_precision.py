"""pi_ref's passes run in the training loss's precision: at the first step theta = theta_ref, so every
row's importance weight is 1, under bf16 autocast too (issue 22, item 2). Through the script, so the
test guards whatever runs the training loop."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hh_tiny import save_nonzero_adapter
from ports import free_port

from lolrl.tasks.paper.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def peaked_llama(tmp_path_factory, tiny_models):
    """A tiny Llama whose logits are as spread as a trained model's (std about 2): bf16 rounding then moves
    a 24-token log-prob by about 0.1, as it does on SmolLM2 (the tiny_models Llama's near-uniform logits hide it)."""
    from transformers import AutoTokenizer

    from lolrl.demo.tiny import build_llama_lm

    directory = tmp_path_factory.mktemp("peaked") / "llama"
    build_llama_lm(AutoTokenizer.from_pretrained(tiny_models["llama"]), directory, hidden=64, heads=2, init_std=0.3)
    return str(directory)


def script_args(toy_dir, model, out, algo, reward, *extra):
    """One optimizer step of 16 rows (``-bs`` in ``extra`` overrides), logged alone, in bf16."""
    return ["-i", str(toy_dir), "-tn", "toy", "--reward", reward, "-m", model, "-o", str(out), "-algo", algo, "-t",
            "-e", "1", "-bs", "16", "-v_bs", "16", "-ml", "24", "--max_steps", "1", "--logging_steps", "1",
            "--num_beams", "1", "--no_test", "--dtype", "bf16", *extra]


def first_step(toy_dir, model, out, algo, reward, *extra):
    """The script's first log entry (:func:`script_args`)."""
    assert main(script_args(toy_dir, model, out, algo, reward, *extra)) == 0
    return json.loads((out / "train_log.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algo", ["a_lol", "a_lol_seq"])
def test_first_step_ratio_is_one_under_bf16(tmp_path, peaked_llama, toy_dir, toy_reward_spec, algo, adapter):
    extra = ["--adapter_path", str(save_nonzero_adapter(peaked_llama, tmp_path / "adapter"))] if adapter else []
    entry = first_step(toy_dir, peaked_llama, tmp_path / "out", algo, toy_reward_spec, *extra)
    assert entry["step"] == 1
    spread = {k: entry[k] for k in ("raw_ratio_min", "raw_ratio_max", "importance_weight_min",
                                    "importance_weight_max")}
    print(algo, "lora" if adapter else "full", spread)
    assert entry["raw_ratio_min"] <= entry["raw_ratio"] <= entry["raw_ratio_max"]
    for name, value in spread.items():
        assert abs(value - 1) <= 1e-3, f"{name} = {value} at step 1 (theta = theta_ref): {spread}"


@pytest.mark.parametrize("algo,reward", [("a_lol", "spec"), ("nll", "none")], ids=["generations", "gold_nll"])
def test_step_zero_validation_matches_the_unchanged_policy_under_bf16(tmp_path, peaked_llama, toy_dir,
                                                                     toy_reward_spec, algo, reward):
    """With a learning rate of 1e-30 (0 is refused) step 1 leaves the weights as they were (the update is
    below their last bit): the policy is pi_ref, so its validation (generations and their rewards, or the
    gold NLL) must equal step 0's, which reuses pi_ref's own generations / runs before training."""
    reward = toy_reward_spec if reward == "spec" else reward
    first_step(toy_dir, peaked_llama, tmp_path / "out", algo, reward, "-ev_b", "-lr", "1e-30")
    stats = [json.loads(line) for line in (tmp_path / "out" / "validation_stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [0, 1]
    start, after = ({k: v for k, v in s.items() if k not in ("step", "epoch")} for s in stats)
    assert start == after


@pytest.mark.distributed
def test_two_processes_first_step_ratio_is_one_under_bf16(tmp_path, peaked_llama, toy_dir, toy_reward_spec):
    """Two gloo processes (DDP): every row of the first window, on either process, has ratio 1."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train_generation_task_with_off_policy_PG.py"), *script_args(
               toy_dir, peaked_llama, out, "a_lol", toy_reward_spec, "-bs", "8")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "training_plan.json").read_text())["global_batch"] == 16
    entry = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    for name in ("raw_ratio_min", "raw_ratio_max", "importance_weight_min", "importance_weight_max"):
        assert abs(entry[name] - 1) <= 1e-3, f"{name} = {entry[name]}"
