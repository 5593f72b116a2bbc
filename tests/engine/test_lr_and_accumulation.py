"""The learning-rate schedule and gradient accumulation do not depend on how many processes train
(issue 22, items 1 and 3): end to end through the scripts, asserting on train_log.jsonl and the
saved weights."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # the fast lane: pytest -m "not slow"

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _launch(script: str, nproc: int, port: int, args: list[str]) -> subprocess.CompletedProcess:
    """``script`` in one process, or in ``nproc`` gloo processes under torchrun."""
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port)]
    proc = subprocess.run([*launcher, str(ROOT / script), *args], capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _logged_lr(out: Path) -> list[float]:
    return [json.loads(line)["lr"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _offline(out, tiny_models, toy_dir, nproc, port, *extra):
    """nll on the toy task, validated by NLL (no generation reward), fp32."""
    return _launch("train_generation_task_with_off_policy_PG.py", nproc, port, [
        "-i", str(toy_dir), "-tn", "toy", "-m", tiny_models["causal"], "-o", str(out), "-algo", "nll", "--reward",
        "none", "-t",
        "-ml", "6", "--num_beams", "1", "-vf", "1", "--no_test", "--logging_steps", "1", *extra])


def test_offline_lr_schedule_is_the_same_with_one_and_two_processes(tmp_path, tiny_models, toy_dir):
    """Linear decay with warmup over 4 optimizer steps: each process count logs the same lr at every
    step (the schedule once stepped once per process per optimizer step: 2 processes logged 1e-3, 0, 0, 0)."""
    common = ["-e", "1", "-bs", "4", "--max_steps", "4", "-lr", "1e-3", "--warmup_ratio", "0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    _offline(one, tiny_models, toy_dir, 1, 0, *common)
    _offline(two, tiny_models, toy_dir, 2, free_port(), *common)
    # 2 warmup steps up to 1e-3, then linear to 0 at step 4 (the lr after each step)
    assert _logged_lr(one) == pytest.approx([5e-4, 1e-3, 5e-4, 0.0], abs=1e-12)
    assert _logged_lr(two) == pytest.approx(_logged_lr(one), abs=1e-12)


def test_accumulated_micro_batches_give_the_update_of_one_batch(tmp_path, tiny_models, toy_dir):
    """k micro-batches of b rows make the same optimizer step as one batch of k*b rows, with one
    process or two, including the short last group of an epoch. The same global batch (8) gives the
    same rows in every step whatever the split: 48 rows, uniform order, no length grouping; per
    epoch one step of 32 rows and one of 16 (accumulation 4: 4 + 2 micro-batches). Plain SGD (an
    update proportional to the gradient), no clipping, dropout off, fp32, a linear schedule with warmup."""
    from safetensors.torch import load_file

    from lolrl.utils.checkpoint import latest_hf_checkpoint as latest_checkpoint

    common = ["-e", "2", "-lr", "0.5", "--optim", "sgd", "--max_grad_norm", "0", "--disable_dropout",
              "--no_length_grouping", "--packing", "off", "--warmup_ratio", "0.25", "--save_steps", "4",
              "--seed", "3"]
    runs = {  # (processes, rows per micro-batch per process, micro-batches per optimizer step)
        "one_8x4": (1, 8, 4), "one_16x2": (1, 16, 2), "two_4x4": (2, 4, 4), "two_8x2": (2, 8, 2)}
    weights = {}
    for name, (nproc, rows, k) in runs.items():
        out = tmp_path / name
        _offline(out, tiny_models, toy_dir, nproc, free_port(), *common, "-bs", str(rows), "-as", str(k))
        plan = json.loads((out / "training_plan.json").read_text())
        assert (plan["global_batch"], plan["optimizer_steps"]) == (rows * nproc, 4)
        checkpoint = latest_checkpoint(out / "checkpoints")
        assert checkpoint.name == "checkpoint-4"
        weights[name] = load_file(str(checkpoint / "model.safetensors"))
    from safetensors.torch import load_file as load

    start = load(str(Path(tiny_models["causal"]) / "model.safetensors"))
    reference = weights["one_8x4"]
    moved = max(float((reference[k] - start[k]).abs().max()) for k in reference if k in start)
    assert moved > 1e-3  # the steps changed the weights: equality below is not trivial
    for name, state in weights.items():
        assert state.keys() == reference.keys(), name
        worst = max(float((state[k] - reference[k]).abs().max()) for k in reference)
        assert worst <= 1e-5, f"{name}: {worst}"


def test_ppo_lr_schedule_is_the_same_with_one_and_two_processes(hh_fixture):
    """PPO: 3 steps x 2 epochs x 2 mini-batches = 12 optimizer steps, 2 of warmup, linear to 0."""
    tmp_path, args = hh_fixture
    common = [*args, "--total_steps", "3", "--eval_steps", "0",
              "--lr_scheduler_type", "linear", "--warmup_steps", "2", "--logging_steps", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    _launch("ppo_qlora_llama_hh.py", 1, 0, [*common, "--output_dir", str(one)])
    _launch("ppo_qlora_llama_hh.py", 2, free_port(), [*common, "--output_dir", str(two)])
    # the lr after each PPO step's 4 optimizer steps: (12 - 4) / 10, (12 - 8) / 10, 0 times 1e-3
    assert _logged_lr(one) == pytest.approx([8e-4, 4e-4, 0.0], abs=1e-12)
    assert _logged_lr(two) == pytest.approx(_logged_lr(one), abs=1e-12)
