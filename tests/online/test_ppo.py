"""Online PPO: learning on a toy reward, the HH scripts (its estimators and losses:
tests/online/test_online_losses.py)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hh_tiny import pro_row, tiny_reward_model
from ports import free_port
from ppo_toy import MAX_NEW, WORDS, target_word_share, word_model

pytestmark = pytest.mark.slow  # the fast lane: pytest -m "not slow"

ROOT = Path(__file__).parents[2]


# ------------------------------------------------------------------------------------ learning
def test_ppo_raises_the_reward_of_a_target_token(tmp_path):
    from lolrl.engine.data import Record
    from lolrl.engine.generation import GenerationSettings
    from lolrl.engine.rewards import RewardFunction
    from lolrl.online.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    word_model(tmp_path / "lm")
    prompts = [" ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(3)) for i in range(32)]
    train = [Record(id=str(i), prompt=p, response="", reward=None) for i, p in enumerate(prompts)]
    config = PPOConfig(model_name=str(tmp_path / "lm"), output_dir=str(tmp_path / "out"), max_steps=30,
                       learning_rate=1e-3, rollout_batch_size=16, per_device_train_batch_size=4,
                       gradient_accumulation_steps=1, init_kl_coef=0.05, adap_kl_ctrl=False, eval_steps=0,
                       eval_on_start=False, seed=0,
                       rollout=GenerationSettings(max_new_tokens=MAX_NEW, num_beams=1, repetition_penalty=1.0,
                                                  do_sample=True, top_p=1.0), save_steps=-1)
    started = time.time()
    PPOTrainer(config, train, [], RewardFunction.from_callables(target_word_share)).run()
    elapsed = time.time() - started
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    rewards = [entry["reward"] for entry in log]
    before, after = np.mean(rewards[:3]), np.mean(rewards[-5:])
    print(f"PPO toy reward: first 3 steps {before:.3f}, last 5 steps {after:.3f}, {elapsed:.1f} s")
    # chance is ~1/19 per token; a policy that learned spends most of its budget on the target
    assert before < 0.15 and after > before + 0.4, rewards
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from pi_ref itself
    assert log[-1]["kl"] > 0.5 and {"entropy", "policy_loss", "value_loss", "kl_coef", "clipfrac"} <= set(log[-1])
    assert elapsed < 60


def test_rollout_tokens_stop_at_the_first_stop_token(tmp_path):
    """The raw tokens PPO optimises: each row's new tokens up to and including its first stop token."""
    from lolrl.engine.collation import TokenizedRow
    from lolrl.engine.generation import GenerationSettings, generate_token_ids
    from lolrl.engine.modeling import load_model, load_tokenizer

    word_model(tmp_path / "lm")
    tokenizer, model = load_tokenizer(str(tmp_path / "lm")), load_model(str(tmp_path / "lm"))
    stop = tokenizer.convert_tokens_to_ids("good")
    rows = [TokenizedRow(i, tokenizer(" ".join(WORDS[i:i + 1 + i % 3]))["input_ids"], []) for i in range(12)]
    settings = GenerationSettings(max_new_tokens=12, num_beams=1, repetition_penalty=1.0, do_sample=True,
                                  stop_token_ids=[stop])
    torch.manual_seed(0)
    out = generate_token_ids(model, tokenizer, rows, settings, batch_size=5, device="cpu")
    stops = {stop, tokenizer.eos_token_id}
    assert len(out) == 12 and all(1 <= len(ids) <= 12 for ids in out)
    assert all(not stops & set(ids[:-1]) for ids in out)  # nothing after a stop token (no padding either)
    assert any(ids[-1] in stops for ids in out) and any(len(ids) == 12 for ids in out)


# ------------------------------------------------------------------------------------- scripts
def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_ppo_script_two_steps_with_the_starting_adapter_as_reference(hh_fixture):
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    tmp_path, args = hh_fixture
    out = tmp_path / "out"
    assert ppo_main(args + ["--output_dir", str(out), "--total_steps", "2", "--eval_steps", "2",
                            "--gradient_checkpointing"]) == 0
    log = _read_jsonl(out / "train_log.jsonl")
    assert [e["step"] for e in log] == [1, 2]
    # policy = reference (the starting adapter, loaded twice) at the first rollout; the coefficient adapts
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5) and log[0]["kl_coef"] == 0.2
    # after one update the policy has left the reference, which stayed frozen (else the KL would stay 0)
    assert abs(log[1]["kl"]) > 1e-4 and log[1]["kl_coef"] < 0.2 and all(0.0 < e["reward"] < 1.0 for e in log)
    assert [v["step"] for v in _read_jsonl(out / "validation_stats.jsonl")] == [0, 2]
    assert all(0 <= v["meteor"] <= 1 for v in _read_jsonl(out / "validation_stats.jsonl"))
    best = out / "best_adapter"
    assert (best / "adapter_model.safetensors").exists() and (best / "value_head.safetensors").exists()
    assert not (best / "reference").exists()  # only the trained adapter is saved
    final = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    start = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert final.keys() == start.keys() and any(not torch.equal(final[k], start[k]) for k in final)
    assert (out / "train_curves.png").exists() and (out / "checkpoints").is_dir()


def test_ppo_script_resumes_where_it_stopped(hh_fixture):
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    tmp_path, args = hh_fixture
    common = args + ["--total_steps", "2", "--eval_steps", "1", "--max_val_examples", "2",
                     "--reward", "lolrl.demo.task:fluency"]  # any reward spec works instead of the RM
    assert ppo_main(common + ["--output_dir", str(tmp_path / "whole")]) == 0
    assert ppo_main(common + ["--output_dir", str(tmp_path / "split"), "--stop_after_steps", "1"]) == 0
    assert not (tmp_path / "split" / "final_adapter").exists()
    assert ppo_main(common + ["--output_dir", str(tmp_path / "split")]) == 0
    whole, split = (load_file(str(tmp_path / d / "final_adapter" / "adapter_model.safetensors"))
                    for d in ("whole", "split"))
    assert all(torch.allclose(whole[k], split[k], atol=1e-6) for k in whole)
    assert [e["step"] for e in _read_jsonl(tmp_path / "split" / "train_log.jsonl")] == [1, 2]
    assert _read_jsonl(tmp_path / "split" / "train_log.jsonl")[1]["reward"] == \
        pytest.approx(_read_jsonl(tmp_path / "whole" / "train_log.jsonl")[1]["reward"])


def test_ppo_hh_eval_script_on_a_full_model(tmp_path, tiny_models):
    tiny_reward_model(tmp_path / "rm")
    test_dir = tmp_path / "hh_test"
    test_dir.mkdir()
    for split, n in (("harmless_base", 3), ("helpful_online", 2)):
        (test_dir / f"{split}.json").write_text("".join(json.dumps(pro_row()) + "\n" for _ in range(n)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "ppo_hh_eval.py"), "--model_name_or_path", tiny_models["causal"],
                           "--reward_model", str(tmp_path / "rm"), "--test_dir", str(test_dir), "--output_dir",
                           str(out), "--per_device_eval_batch_size", "2"],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "hh_eval_results.json").read_text())
    assert set(results) == {"harmless_base", "helpful_online"} and results["harmless_base"]["n"] == 3
    lines = _read_jsonl(out / "harmless_base_eval_results.jsonl")
    assert len(lines) == 3 and set(lines[0]) == {"prefix", "suffix", "reward"}
    assert lines[0]["prefix"] == "Human: Q1\nAssistant: A1\nHuman: Q2\nAssistant:"  # the Anthropic format
    assert all(0.0 < line["reward"] < 1.0 for line in lines)
    assert (out / "hh_eval_results.md").exists() and (out / "hh_eval_results.csv").exists()
    assert (out / "hh_reward_distribution.png").exists()


@pytest.mark.parametrize("trainer", ["grpo", "rloo"])
def test_trl_grpo_and_rloo_behind_the_same_script(hh_fixture, trainer):
    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    tmp_path, args = hh_fixture
    out = tmp_path / "out"
    assert ppo_main(args + ["--output_dir", str(out), "--trainer", trainer, "--num_generations", "2",
                            "--total_steps", "2", "--eval_steps", "2"]) == 0
    assert [v["step"] for v in _read_jsonl(out / "validation_stats.jsonl")] == [0, 2]
    assert (out / "best_adapter" / "adapter_model.safetensors").exists()
    assert not (out / "best_adapter" / "ref").exists()  # TRL's frozen copy of the starting adapter is not saved


def test_trl_trainers_respect_the_folder_lock(hh_fixture, capsys):
    """GRPO / RLOO take the output folder's lock like every other run: a folder in use is refused (exit 2)."""
    import socket

    from lolrl.utils.lock import LOCK_NAME

    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    tmp_path, args = hh_fixture
    held = tmp_path / "held"
    held.mkdir()
    (held / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    assert ppo_main(args + ["--output_dir", str(held), "--trainer", "grpo", "--total_steps", "1"]) == 2
    assert f"in use by pid {os.getppid()}" in capsys.readouterr().err
    assert not (held / "validation_stats.jsonl").exists()


@pytest.mark.distributed
def test_ppo_script_with_two_processes(hh_fixture):
    """torchrun, two gloo processes: each rolls out its share, the KL controller and the early stop
    decide alike, only the main process writes, and the run exits (no teardown hang)."""
    tmp_path, args = hh_fixture
    out = tmp_path / "out2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "ppo_qlora_llama_hh.py"), *args, "--output_dir", str(out), "--total_steps", "2",
           "--eval_steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["step"] for e in _read_jsonl(out / "train_log.jsonl")] == [1, 2]  # one writer
    assert [v["step"] for v in _read_jsonl(out / "validation_stats.jsonl")] == [0, 2]
    assert (out / "final_adapter" / "adapter_model.safetensors").exists()
