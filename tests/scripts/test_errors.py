"""Bad input through the script: one line naming what is wrong, exit status 2, no traceback."""
import json
import sys
from pathlib import Path

import pytest

from lolrl.tasks.paper.cli import main

TESTS = Path(__file__).resolve().parents[1]  # the tests folder: helpers, data
sys.path.insert(0, str(TESTS))


def base(toy_dir, model, out, reward="lolrl.demo.task:safety", algo="a_lol"):
    return ["-i", str(toy_dir), "-tn", "toy", "--reward", reward, "-m", model, "-o", str(out), "-algo", algo,
            "-t", "-e", "1", "-bs", "8", "-v_bs", "16", "-ml", "6", "--num_beams", "1", "--max_steps", "1"]


def run_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        code = main(argv)
        raise SystemExit(code)
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    # log lines and progress bars may come first (errors found once models run); the error is one line
    err = stderr.strip().splitlines()[-1].split("\r")[-1]
    assert err.startswith("error:"), stderr[-2000:]
    return err


def copy_task(src: Path, dst: Path, edit=None) -> Path:
    dst.mkdir()
    for split in ("train", "val", "test"):
        rows = [json.loads(l) for l in (src / f"{split}.jsonl").read_text().splitlines()]
        if edit:
            rows = edit(split, rows)
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def test_unknown_algorithm_is_one_line(tmp_path, tiny_models, toy_dir, capsys):
    err = run_error(base(toy_dir, tiny_models["causal"], tmp_path / "o", algo="ppo"), capsys)
    assert "invalid choice: 'ppo'" in err


def test_infinite_reward_in_data(tmp_path, tiny_models, toy_dir, capsys):
    def edit(split, rows):
        if split == "train":
            rows[3]["reward_components"]["final_reward"] = float("inf")
        return rows
    data = copy_task(toy_dir, tmp_path / "d", edit)
    err = run_error(base(data, tiny_models["causal"], tmp_path / "o"), capsys)
    assert "train.jsonl:4: field 'reward_components.final_reward'" in err


def test_missing_and_empty_split_files(tmp_path, tiny_models, toy_dir, capsys):
    data = copy_task(toy_dir, tmp_path / "d")
    (data / "val.jsonl").write_text("\n")
    assert "val.jsonl: has no records" in run_error(base(data, tiny_models["causal"], tmp_path / "o"), capsys)
    (data / "val.jsonl").unlink()
    assert "val.jsonl: file not found" in run_error(base(data, tiny_models["causal"], tmp_path / "o"), capsys)


@pytest.mark.parametrize("function, words", [("wrong_length", "wrong_length"), ("not_finite", "non-finite")])
def test_reward_function_breaking_its_contract(tmp_path, tiny_models, toy_dir, capsys, function, words):
    reward = f"{TESTS / 'bad_rewards.py'}:{function}"
    err = run_error(base(toy_dir, tiny_models["causal"], tmp_path / "o", reward=reward), capsys)
    assert words in err and function in err


def test_no_leftover_lunch(tmp_path, tiny_models, toy_dir, capsys):
    """Every training reward is 0 while pi_ref's generations score 1: all advantages are negative."""
    def edit(split, rows):
        for row in rows:
            row["reward_components"] = {"final_reward": 0.0}
        return rows
    data = copy_task(toy_dir, tmp_path / "d", edit)
    reward = f"{TESTS / 'bad_rewards.py'}:constant_one"
    err = run_error(base(data, tiny_models["causal"], tmp_path / "o", reward=reward), capsys)
    assert "no leftover lunch" in err and "check the reward scale" in err


def test_tokenizer_without_pad_token_is_handled(tmp_path, tiny_models, toy_dir):
    from transformers import AutoTokenizer

    from lolrl.engine.modeling import load_tokenizer

    assert AutoTokenizer.from_pretrained(tiny_models["causal"]).pad_token is None
    tokenizer = load_tokenizer(tiny_models["causal"])
    assert tokenizer.pad_token == tokenizer.eos_token
    assert main(base(toy_dir, tiny_models["causal"], tmp_path / "o", algo="nll")) == 0
