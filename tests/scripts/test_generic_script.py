"""A few training steps of every algorithm through the script, on tiny causal and seq2seq models."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import status_of
from safetensors.torch import load_file
from script_args import args_for

from lolrl.engine.losses import ALGORITHMS
from lolrl.tasks.paper.cli import main

pytestmark = pytest.mark.slow  # the fast lane: pytest -m "not slow"

ROOT = Path(__file__).parents[2]


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_trains(tmp_path, tiny_models, toy_dir, toy_reward_spec, algo, kind):
    out = tmp_path / "out"
    assert main(args_for(toy_dir, tiny_models[kind], out, algo, toy_reward_spec)) == 0
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(entry["loss"]) for entry in log)
    assert log[-1]["step"] == 3
    results = json.loads((out / "eval_results.json").read_text())
    assert {"val/generated", "test/generated", "test/gold"} <= set(results)
    for key in ("safety", "on_topic", "fluency", "final_reward", "distinct_1", "distinct_2", "distinct_3",
                "avg_response_len"):
        assert key in results["test/generated"]
    # the saved best model differs from the start: training changed the weights
    start, best = weights(tiny_models[kind]), weights(out / "model")
    assert any(not torch.equal(start[k], best[k]) for k in start if k in best)
    if algo.startswith("a_lol"):
        stats = json.loads((out / "advantage_stats.json").read_text())
        assert 0 <= stats["share_negative"] <= 1 and len(stats["percentiles"]) == 11
        assert json.loads((out / "value_fit.json").read_text())["n_fit"] >= 3
    if algo in ("r_lol", "a_lol", "a_lol_seq"):
        assert all("importance_weight" in entry for entry in log)
        assert all(0.1 - 1e-6 <= entry["importance_weight"] <= 1.9 + 1e-6 for entry in log)


def test_outputs_and_plots(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    out = tmp_path / "out"
    assert main(args_for(toy_dir, tiny_models["causal"], out, "a_lol", toy_reward_spec, "-ev_b")) == 0
    for name in ("args.json", "train_log.jsonl", "validation_stats.jsonl", "eval_results.json", "eval_results.csv",
                 "eval_results.md", "test_generations.jsonl", "val_generations.jsonl", "advantage_stats.json",
                 "train_loss_trajectory.png", "reward_distribution_test.png", "validation_curve.png",
                 "training_plan.json", "model/best.json", "model/model.safetensors"):
        assert (out / name).exists(), name
    assert (out / "train_loss_trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert validations[0]["step"] == 0  # -ev_b validates the starting model first
    plan = json.loads((out / "training_plan.json").read_text())
    stats = json.loads((out / "advantage_stats.json").read_text())
    positive = round((1 - stats["share_non_positive"]) * stats["n"])
    assert plan["rows_per_epoch"] == positive  # the epoch is shortened to the positive-advantage rows
    assert json.loads((out / "reward_check.json").read_text())["max_abs_diff"] < 1e-9  # same reward as the data


def test_lora_accumulation_and_evaluation_of_the_adapter(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    out, saved = tmp_path / "out", tmp_path / "adapter"
    argv = args_for(toy_dir, tiny_models["causal"], out, "a_lol_seq", toy_reward_spec, "--lora_r", "4",
                    "-as", "2", "-s", str(saved))
    assert main(argv) == 0
    assert (saved / "adapter_model.safetensors").exists() and not (saved / "model.safetensors").exists()
    plan = json.loads((out / "training_plan.json").read_text())
    assert plan["optimizer_steps_per_epoch"] == -(-plan["micro_steps_per_epoch"] // 2)
    # without -t the script evaluates the saved model: here an adapter folder, loaded on its base
    argv = ["-i", str(toy_dir), "-tn", "toy", "--reward", toy_reward_spec, "-m", tiny_models["causal"],
            "-s", str(saved), "-o", str(tmp_path / "eval"), "-ml", "10", "--num_beams", "1"]
    assert main(argv) == 0
    trained = json.loads((out / "eval_results.json").read_text())["test/generated"]
    evaluated = json.loads((tmp_path / "eval" / "eval_results.json").read_text())["test/generated"]
    assert evaluated["final_reward"] == pytest.approx(trained["final_reward"], abs=1e-6)


def test_cache_is_reused_and_invalidated(tmp_path, tiny_models, toy_dir, toy_reward_spec, caplog):
    cache = tmp_path / "cache"
    common = ["-cd", str(cache)]
    assert main(args_for(toy_dir, tiny_models["causal"], tmp_path / "a", "a_lol", toy_reward_spec, *common)) == 0
    first = json.loads((tmp_path / "a" / "advantage_stats.json").read_text())
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(args_for(toy_dir, tiny_models["causal"], tmp_path / "b", "a_lol", toy_reward_spec, *common)) == 0
    assert "reusing cache" in caplog.text
    assert json.loads((tmp_path / "b" / "advantage_stats.json").read_text()) == first
    assert (tmp_path / "b" / "value_fit.json").exists() and (tmp_path / "b" / "reward_check.json").exists()
    caplog.clear()
    with caplog.at_level("INFO"):  # another max length changes the reference pass: recomputed
        assert main(args_for(toy_dir, tiny_models["causal"], tmp_path / "c", "a_lol", toy_reward_spec, *common,
                             "--max_prompt_length", "8")) == 0
    assert "computed from other inputs" in caplog.text


@pytest.mark.parametrize("extra, message", [
    (["-algo", "a_lol", "-b", "0.1"], "only used by a_lol_kl"),
    (["-algo", "a_lol_kl", "-c", "0.2"], "no importance weight to clip"),
    (["--reward", "nope_module:fn"], "cannot import module 'nope_module'"),
    (["-m", "./no/such/model"], "does not exist"),
    (["-tn", "my_task", "--reward", None], "pass --reward"),  # a paper task has a built-in recipe
])
def test_user_errors_exit_2_with_one_line(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys, extra, message):
    argv = args_for(toy_dir, tiny_models["causal"], tmp_path / "o", "nll", toy_reward_spec)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, value]
    assert status_of(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("adapter, message", [
    ("./no/such/adapter", "model path './no/such/adapter' does not exist"),
    ("nope_adapter", "cannot load the adapter from 'nope_adapter'"),  # a hub id that is not cached, offline
])
def test_missing_adapter_is_one_error_line(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys, adapter, message):
    """Found when the model loads (after the run's first log lines): an error line, no traceback."""
    argv = [*args_for(toy_dir, tiny_models["causal"], tmp_path / "o", "nll", toy_reward_spec),
            "--adapter_path", adapter]
    assert status_of(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error:") and message in err.splitlines()[-1] and "Traceback" not in err


def test_bad_row_reported_before_model_loads(tmp_path, toy_dir, toy_reward_spec, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val", "test"):
        (data / f"{split}.jsonl").write_text((toy_dir / f"{split}.jsonl").read_text())
    with open(data / "train.jsonl", "a") as handle:
        handle.write('{"id": "z", "prompt": "p", "response": "r", "reward": "high"}\n')
    # the model path does not exist either: the data error must come first
    argv = args_for(data, str(tmp_path / "missing_model"), tmp_path / "o", "wbc", toy_reward_spec)
    assert status_of(main, argv) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:49: field 'reward'" in err


def test_script_file_runs_nll_without_reward(tmp_path, tiny_models, toy_dir):
    """The top-level script, as a user runs it; --reward none selects by gold NLL."""
    out = tmp_path / "nll"
    proc = subprocess.run([sys.executable, str(ROOT / "train_generation_task_with_off_policy_PG.py"),
                           "-i", str(toy_dir), "-tn", "toy", "--reward", "none", "-m", tiny_models["causal"],
                           "-o", str(out), "-s", str(tmp_path / "saved"), "-algo", "nll", "-t", "-e", "2",
                           "-bs", "8", "-lr", "1e-2", "-ml", "10", "--num_beams", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert len(validations) == 4  # -vf 2 validations per epoch, 2 epochs
    assert validations[-1]["neg_nll_per_token"] > validations[0]["neg_nll_per_token"]  # NLL training lowers NLL
    assert (tmp_path / "saved" / "model.safetensors").exists()


def test_packed_and_padded_training_agree(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    logs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        assert main(args_for(toy_dir, tiny_models["llama"], out, "a_lol", toy_reward_spec, "--packing", mode,
                             "--logging_steps", "1")) == 0
        logs[mode] = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    for on, off in zip(logs["on"], logs["off"]):
        for key in ("loss", "nll", "importance_weight"):
            assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-5), key
