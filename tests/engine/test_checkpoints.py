"""Checkpoints and resume: a run stopped after k steps and resumed ends where an uninterrupted run ends."""
import json
from pathlib import Path

import pytest
from conftest import status_of
from safetensors.torch import load_file

from lolrl.tasks.paper.cli import main
from lolrl.utils.checkpoint import latest_hf_checkpoint as latest_checkpoint


def argv(toy_dir, model, out, reward, *extra):
    # dropout on (--keep_dropout), so the torch RNG state must be restored too
    return ["-i", str(toy_dir), "-tn", "toy", "--reward", reward, "-m", model, "-o", str(out), "-algo", "wbc",
            "--keep_dropout", "-t", "-e", "2", "-bs", "8", "-as", "2", "-v_bs", "16", "-ml", "8", "--num_beams", "1",
            "-vf", "1", "-lr", "1e-3", "--save_steps", "1", "--no_test", *extra]


def final_params(out: Path) -> dict:
    return load_file(str(latest_checkpoint(out / "checkpoints") / "model.safetensors"))


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path, tiny_models, toy_dir, toy_reward_spec, caplog):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(argv(toy_dir, tiny_models["causal"], whole, toy_reward_spec)) == 0
    assert main(argv(toy_dir, tiny_models["causal"], split, toy_reward_spec, "--stop_after_steps", "4")) == 0
    assert not (split / "eval_results.json").exists()  # stopped: no final evaluation yet
    assert latest_checkpoint(split / "checkpoints").name == "checkpoint-4"
    with caplog.at_level("INFO"):
        assert main(argv(toy_dir, tiny_models["causal"], split, toy_reward_spec)) == 0
    assert "resuming from" in caplog.text
    a, b = final_params(whole), final_params(split)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    steps = [json.loads(l)["step"] for l in (split / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice across the two runs
    whole_val = (whole / "validation_stats.jsonl").read_text().splitlines()
    split_val = (split / "validation_stats.jsonl").read_text().splitlines()
    assert len(whole_val) == len(split_val)
    assert len(list((split / "checkpoints").glob("checkpoint-*"))) == 2  # --keep_checkpoints 2


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys):
    out = tmp_path / "o"
    assert main(argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "--stop_after_steps", "1")) == 0
    assert status_of(main, argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "-lr", "5e-4")) == 2
    assert "other settings" in capsys.readouterr().err
    # --no_resume starts over
    assert main(argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "-lr", "5e-4", "--no_resume")) == 0


def test_resume_flag_without_checkpoint_is_an_error(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys):
    assert status_of(main, argv(toy_dir, tiny_models["causal"], tmp_path / "o", toy_reward_spec, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_interrupted_checkpoint_write_is_ignored(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    out = tmp_path / "o"
    assert main(argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "--stop_after_steps", "2")) == 0
    # a save killed half-way leaves a checkpoint without its manifest (written last): never read
    incomplete = out / "checkpoints" / "checkpoint-9"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-2"
    assert main(argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "--stop_after_steps", "3")) == 0
    assert latest_checkpoint(out / "checkpoints").name == "checkpoint-3"


@pytest.mark.slow
def test_a_run_folder_moved_elsewhere_resumes_there(tmp_path, tiny_models, toy_dir, toy_reward_spec, caplog, capsys):
    """A scratch folder (model, data, output and cache inside) stopped after 4 steps, then moved to another
    place and resumed under the new paths: it resumes and ends where an uninterrupted run ends. The run
    key holds contents, not paths: a result-changing setting, or other model files at the same path,
    are still refused."""
    import shutil

    def args(root, *extra):
        return argv(root / "data", str(root / "model"), root / "out", toy_reward_spec, "-cd", str(root / "cache"),
                    *extra)

    first = tmp_path / "scratch"
    shutil.copytree(tiny_models["causal"], first / "model")
    shutil.copytree(toy_dir, first / "data")
    assert main(args(first, "--stop_after_steps", "4")) == 0
    moved = tmp_path / "other_mount" / "copied_scratch"
    shutil.copytree(first, moved)
    shutil.rmtree(first)

    assert status_of(main, args(moved, "-lr", "5e-4")) == 2  # still refused: another learning rate
    assert "other settings" in capsys.readouterr().err
    config = moved / "model" / "config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "initializer_range": 0.5}))
    assert status_of(main, args(moved)) == 2  # still refused: other model files at the same path
    assert "other settings" in capsys.readouterr().err
    config.write_text(original)

    with caplog.at_level("INFO"):
        assert main(args(moved)) == 0
    assert "resuming from" in caplog.text and "checkpoint-4" in caplog.text
    whole = tmp_path / "whole"
    assert main(argv(toy_dir, tiny_models["causal"], whole, toy_reward_spec)) == 0
    a, b = final_params(whole), final_params(moved / "out")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
