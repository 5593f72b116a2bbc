"""Two CPU processes (gloo) train together through the real script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ports import free_port

from lolrl.engine.losses import ALGORITHMS

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # the fast lane: pytest -m "not slow"

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize("algo", ["a_lol"])
def test_two_processes_train_a_lol(tmp_path, tiny_models, toy_dir, toy_reward_spec, algo):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "train_generation_task_with_off_policy_PG.py"), "-i", str(toy_dir), "-tn", "toy",
           "--reward", toy_reward_spec, "-m", tiny_models["causal"], "-o", str(out), "-algo", algo, "-t",
           "-e", "1", "-bs", "4", "-v_bs", "8", "-ml", "10", "--num_beams", "1", "-vf", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((out / "training_plan.json").read_text())
    assert plan["global_batch"] == 8  # 2 processes x 4 rows
    stats = json.loads((out / "advantage_stats.json").read_text())
    positive = round((1 - stats["share_non_positive"]) * stats["n"])
    assert plan["optimizer_steps_per_epoch"] == -(-positive // 8)
    assert (out / "model" / "model.safetensors").exists()
    # written once, by the main process only
    assert proc.stdout.count("| split |") == 1
    assert len((out / "validation_stats.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("algo", [a for a in ALGORITHMS if a != "a_lol"])
def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_models, toy_dir, toy_reward_spec, algo):
    """`accelerate launch --multi_gpu` starts two gloo processes on a CPU-only machine (see docs/distributed.md)."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(ROOT / "train_generation_task_with_off_policy_PG.py"), "-i", str(toy_dir), "-tn", "toy",
           "--reward", toy_reward_spec, "-m", tiny_models["causal"], "-o", str(out), "-algo", algo, "-t",
           "-e", "1", "-bs", "4", "-v_bs", "8", "-ml", "6", "--num_beams", "1", "-vf", "1", "--max_steps", "2",
           "--no_test"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "training_plan.json").read_text())["global_batch"] == 8
    assert [json.loads(l)["step"] for l in (out / "train_log.jsonl").read_text().splitlines()] == [2]


def _launch_resumable(out, tiny_models, toy_dir, toy_reward_spec, port, *extra, fault=None):
    """Two gloo CPU processes, wbc with --keep_dropout (dropout on: every process's RNG must be restored), 4 steps.
    ``fault``: kill the processes at a named point (``LOLRL_FAULT``); the launch then fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **({"LOLRL_FAULT": fault} if fault else {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train_generation_task_with_off_policy_PG.py"), "-i", str(toy_dir), "-tn", "toy",
           "--reward", toy_reward_spec, "-m", tiny_models["causal"], "-o", str(out), "-algo", "wbc", "-t",
           "-e", "1", "-bs", "4", "-v_bs", "8", "-ml", "6", "--num_beams", "1", "-vf", "1", "--max_steps", "4",
           "-lr", "1e-3", "--save_steps", "1", "--no_test", "--keep_dropout", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert (proc.returncode != 0) if fault else (proc.returncode == 0), proc.stderr[-3000:]
    return proc


def test_two_process_run_stopped_and_resumed_matches_an_uninterrupted_one(tmp_path, tiny_models, toy_dir,
                                                                          toy_reward_spec):
    from safetensors.torch import load_file

    from lolrl.utils.checkpoint import latest_hf_checkpoint as latest_checkpoint

    whole, split = tmp_path / "whole", tmp_path / "split"
    _launch_resumable(whole, tiny_models, toy_dir, toy_reward_spec, free_port())
    _launch_resumable(split, tiny_models, toy_dir, toy_reward_spec, free_port(), "--stop_after_steps", "2")
    stopped = latest_checkpoint(split / "checkpoints")
    assert stopped.name == "checkpoint-2"
    # the Trainer's checkpoint: each process's RNG states (dropout), sealed by the manifest
    states = [torch.load(stopped / f"rng_state_{rank}.pth", weights_only=False)["cpu"] for rank in (0, 1)]
    assert not torch.equal(states[0], states[1])
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "lolrl_seal.json"} <= set(manifest["files"])
    assert "resuming from" in _launch_resumable(split, tiny_models, toy_dir, toy_reward_spec, free_port()).stderr
    a = load_file(str(latest_checkpoint(whole / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(split / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and latest_checkpoint(split / "checkpoints").name == "checkpoint-4"
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def test_two_process_run_killed_while_checkpointing_resumes_to_the_same_parameters(tmp_path, tiny_models, toy_dir,
                                                                                 toy_reward_spec):
    """Both processes SIGKILLed inside the third checkpoint (the Trainer's model written, its optimizer not:
    no manifest), then rerun: it resumes from the second and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    from lolrl.utils.checkpoint import latest_hf_checkpoint

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _launch_resumable(whole, tiny_models, toy_dir, toy_reward_spec, free_port())
    _launch_resumable(killed, tiny_models, toy_dir, toy_reward_spec, free_port(), fault="mid_checkpoint_save:3")
    assert (killed / "checkpoints" / "checkpoint-3").is_dir()  # written in part, never sealed
    assert latest_hf_checkpoint(killed / "checkpoints").name == "checkpoint-2"
    rerun = _launch_resumable(killed, tiny_models, toy_dir, toy_reward_spec, free_port())
    assert "resuming from" in rerun.stderr and "checkpoint-2" in rerun.stderr.split("resuming from", 1)[1]
    a = load_file(str(latest_hf_checkpoint(whole / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_hf_checkpoint(killed / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys() and latest_hf_checkpoint(killed / "checkpoints").name == "checkpoint-4"
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


def test_sharded_weights_generate_the_same_number_of_times_on_every_process(tiny_models):
    """Under ZeRO-3 / FSDP every process must join every generate call (synced_gpus): a process
    with fewer rows runs dummy batches whose output is dropped."""
    from lolrl.engine.collation import Tokenizer
    from lolrl.engine.data import Record
    from lolrl.engine.generation import GenerationSettings, batches_per_process, generate_local
    from lolrl.engine.modeling import load_model, load_tokenizer

    assert batches_per_process(10, 3, 2) == 2 and batches_per_process(9, 2, 4) == 2
    assert batches_per_process(0, 2, 4) == 0
    tokenizer = load_tokenizer(tiny_models["llama"])
    model = load_model(tiny_models["llama"]).eval()
    calls = []
    real_generate = model.generate

    def recording_generate(**kwargs):
        calls.append(kwargs.pop("synced_gpus", False))
        return real_generate(**kwargs)

    model.generate = recording_generate
    rows = Tokenizer(tokenizer, False, 32, 8)([Record(id=str(i), prompt=f"hello {i}", response="x") for i in range(3)])
    settings = GenerationSettings(max_new_tokens=3, num_beams=1, repetition_penalty=1.0)
    out = generate_local(model, tokenizer, rows, settings, batch_size=2, device="cpu", show_progress=False,
                         synced_batches=4)
    assert calls == [True] * 4 and sorted(out) == [0, 1, 2]  # 2 real batches + 2 dummies, only real rows kept
    calls.clear()
    assert generate_local(model, tokenizer, [], settings, 2, "cpu", show_progress=False, synced_batches=1) == {}
    assert calls == [True]
    # the prompt states of the generation's prefill: the real rows', none of the dummies'
    from lolrl.engine.generation import _generate_rows

    texts, states = _generate_rows(model, tokenizer, rows, settings, 2, "cpu", show_progress=False, synced_batches=4,
                                   capture=True)
    assert texts == out and sorted(states) == [0, 1, 2]
    assert [states[r.index].shape[0] for r in rows] == [len(r.prompt_ids) for r in rows]
