"""Trustworthy runs (issue 13): non-finite numbers never pass, everything read back is verified,
results do not depend on cache state, caches are keyed by all they read, no two runs share a folder,
and every user error is one line."""
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import status_of
from safetensors.torch import load_file

from lolrl.tasks.paper.cli import main
from lolrl.utils.checkpoint import latest_hf_checkpoint as latest_checkpoint
from lolrl.utils.errors import UserError
from lolrl.utils.finite import NonFiniteError, StepGuard, check_finite_state


def argv(toy_dir, model, out, reward, *extra, algo="wbc"):
    return ["-i", str(toy_dir), "-tn", "toy", "--reward", reward, "-m", model, "-o", str(out), "-algo", algo,
            "-t", "-e", "1", "-bs", "8", "-as", "1", "-v_bs", "16", "-ml", "8", "--num_beams", "1", "-vf", "1",
            "-lr", "1e-3", "--save_steps", "2", "--no_test", *extra]


def one_line_errors(stderr: str) -> list[str]:
    """The ``error: ...`` lines of a script's stderr (a progress bar may share the line before it)."""
    return ["error: " + line.split("error: ", 1)[1] for line in stderr.splitlines() if "error: " in line]


def trainable(out: Path) -> dict:
    return load_file(str(latest_checkpoint(out / "checkpoints") / "model.safetensors"))


# ------------------------------------------------------------------------------------ 1. non-finite
def test_step_guard_skips_then_stops():
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    guard = StepGuard(max_in_a_row=2)
    assert guard.allow_step([1.0], model, 1)
    assert not guard.allow_step([math.nan], model, 2)  # a NaN loss: skipped
    assert guard.allow_step([1.0], model, 3)  # a good step resets the count
    model.weight.grad[0, 0] = math.inf
    assert not guard.allow_step([1.0], model, 4)  # an inf gradient: skipped
    with pytest.raises(NonFiniteError, match="2 steps in a row"):
        guard.allow_step([1.0], model, 5)
    assert issubclass(NonFiniteError, UserError)


def test_non_finite_state_is_never_saved():
    check_finite_state({"w": torch.ones(2)}, "x")
    with pytest.raises(NonFiniteError, match="'w' is not finite"):
        check_finite_state({"ok": torch.ones(1), "w": torch.tensor([1.0, math.nan])}, "the best model")


def test_diverging_run_stops_with_one_line(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys):
    out = tmp_path / "o"
    code = main(argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "-lr", "1e30", "--save_steps", "1"))
    errors = one_line_errors(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1 and "non-finite" in errors[0], errors
    for path in (out / "checkpoints").glob("step_*/trainable.safetensors"):  # whatever was saved is finite
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_overflowing_reward_is_refused_with_its_row(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys):
    bad = tmp_path / "task"
    bad.mkdir()
    for split in ("train", "val", "test"):
        (bad / f"{split}.jsonl").write_text((Path(toy_dir) / f"{split}.jsonl").read_text())
    lines = (bad / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["reward"] = 1e308
    row.pop("reward_components", None)
    lines[2] = json.dumps(row)
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    assert status_of(main, argv(bad, tiny_models["causal"], tmp_path / "o", toy_reward_spec)) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:3" in err and "reward" in err and "1e+308" in err


# ------------------------------------------------------------------------------------- 2. integrity
def flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_cache_with_flipped_bytes_or_wrong_shape_is_recomputed(tmp_path, caplog):
    from lolrl.utils.cache import Cache, hash_json

    cache, key = Cache(tmp_path), hash_json("k")
    cache.save("entry", key, {"offsets": [0, 3]}, {"x": torch.arange(3.0)})
    assert cache.load("entry", key) is not None
    flip_byte(tmp_path / "entry.safetensors")  # a flipped bit inside a tensor: still a valid file
    with caplog.at_level("WARNING"):
        assert cache.load("entry", key) is None
    assert "damaged" in caplog.text
    cache.save("entry", key, {"offsets": [0, 3]}, {"x": torch.arange(3.0)})
    meta = json.loads((tmp_path / "entry.json").read_text())
    meta["payload"]["offsets"] = [0, 4]  # an edited payload: valid JSON, wrong digest
    (tmp_path / "entry.json").write_text(json.dumps(meta))
    assert cache.load("entry", key) is None
    (tmp_path / "entry.json").write_text("[1, 2]")  # JSON of the wrong type: damaged, not a traceback
    assert cache.load("entry", key) is None

    def check(payload, tensors):
        assert tensors["x"].shape == (4,)

    cache.save("entry", key, {"offsets": [0, 3]}, {"x": torch.arange(3.0)})
    assert cache.load("entry", key, check) is None  # intact but not of the expected shape


def test_flipped_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_models, toy_dir, toy_reward_spec,
                                                           caplog, capsys):
    out = tmp_path / "o"
    run = argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "--save_steps", "1")
    assert main(run + ["--stop_after_steps", "3"]) == 0
    newest = out / "checkpoints" / "checkpoint-3"
    flip_byte(newest / "model.safetensors")
    with caplog.at_level("INFO"):
        assert main(run + ["--stop_after_steps", "4"]) == 0
    assert "checkpoint-3 is damaged" in caplog.text and "resuming from" in caplog.text
    assert "checkpoint-2" in caplog.text.split("resuming from", 1)[1].splitlines()[0]
    # every checkpoint damaged: refused with one line, nothing overwritten
    for path in (out / "checkpoints").glob("checkpoint-*/lolrl_seal.json"):
        path.write_text('{"step": "three"}')
    assert status_of(main, run) == 2
    assert "no intact checkpoint" in one_line_errors(capsys.readouterr().err)[0]


def test_strict_load_refuses_foreign_parameters():
    from lolrl.utils.manifest import IntegrityError
    from lolrl.utils.trainable import load_trainable

    model = torch.nn.Linear(2, 2)
    load_trainable(model, {"weight": torch.zeros(2, 2), "bias": torch.ones(2)}, "x")
    assert torch.equal(model.bias, torch.ones(2))
    with pytest.raises(IntegrityError, match="missing"):
        load_trainable(model, {"weight": torch.zeros(2, 2)}, "x")
    with pytest.raises(IntegrityError, match="the model's"):
        load_trainable(model, {"weight": torch.zeros(3, 2), "bias": torch.ones(2)}, "x")


# ---------------------------------------------------------------------------------- 3. cache state
@pytest.mark.slow
def test_same_parameters_with_a_cold_and_a_warm_cache(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    """a_lol with dropout on: the reference pass, value fit and pi_ref's generations come from the cache
    in the second run; the training RNG stream must not notice."""
    cache = tmp_path / "cache"
    common = ["--cache_dir", str(cache), "--keep_dropout", "--eval_in_beginning"]
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    assert main(argv(toy_dir, tiny_models["causal"], cold, toy_reward_spec, *common, algo="a_lol")) == 0
    assert (cache / "reference_pass.json").exists()
    assert main(argv(toy_dir, tiny_models["causal"], warm, toy_reward_spec, *common, algo="a_lol")) == 0
    a, b = trainable(cold), trainable(warm)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


# ------------------------------------------------------------------------------------ 4. cache keys
def test_cache_keys_cover_reward_columns_and_reward_source(tmp_path):
    from lolrl.engine.data import Record
    from lolrl.engine.rewards import load_reward
    from lolrl.utils.cache import records_digest

    rows = [Record("a", "p", "r", 1.0, meta={"gold": "x"})]
    assert records_digest(rows) != records_digest([Record("a", "p", "r", 1.0, meta={"gold": "y"})])
    source = tmp_path / "my_reward.py"
    source.write_text("def score(prompts, completions, **kw):\n    return [1.0 for _ in completions]\n")
    before = load_reward(f"{source}:score").cache_key()
    source.write_text("def score(prompts, completions, **kw):\n    return [2.0 for _ in completions]\n")
    after = load_reward(f"{source}:score").cache_key()
    assert before["components"][0]["source"] == after["components"][0]["source"]
    assert before != after  # the same spec text, an edited file: another cache key


# -------------------------------------------------------------------------------- 5. no clobbering
def test_a_second_run_on_a_held_folder_is_refused(tmp_path, tiny_models, toy_dir, toy_reward_spec, capsys, caplog):
    import socket
    import subprocess
    import sys

    from lolrl.utils.lock import LOCK_NAME

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        assert status_of(main, argv(toy_dir, tiny_models["causal"], out, toy_reward_spec)) == 2
        error = one_line_errors(capsys.readouterr().err)[0]
        assert f"in use by pid {holder.pid} on host {socket.gethostname()}" in error
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, taken over with a message; released at the end
    with caplog.at_level("WARNING"):
        assert main(argv(toy_dir, tiny_models["causal"], out, toy_reward_spec, "-e", "0")) == 0
    assert "taking over the lock" in caplog.text and not (out / LOCK_NAME).exists()


def test_save_folder_inside_the_starting_model_and_output_file_refused(tmp_path, tiny_models, toy_dir,
                                                                       toy_reward_spec, capsys):
    model = tiny_models["causal"]
    before = sorted(p.name for p in Path(model).iterdir())
    inside = argv(toy_dir, model, tmp_path / "o", toy_reward_spec, "--save_dir", str(Path(model) / "best"))
    assert status_of(main, inside) == 2
    assert "inside the starting model" in one_line_errors(capsys.readouterr().err)[0]
    assert status_of(main, argv(toy_dir, model, model, toy_reward_spec)) == 2  # -o the model folder: saves into it
    assert "inside the starting model" in one_line_errors(capsys.readouterr().err)[0]
    assert sorted(p.name for p in Path(model).iterdir()) == before
    # evaluating a saved model (no -t) saves nothing: its folder may be the starting model
    evaluate = [a for a in argv(toy_dir, model, tmp_path / "e", toy_reward_spec, "-s", model) if a != "-t"]
    assert main(evaluate) == 0 and sorted(p.name for p in Path(model).iterdir()) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert status_of(main, argv(toy_dir, model, afile, toy_reward_spec)) == 2
    assert "is a file, not a folder" in one_line_errors(capsys.readouterr().err)[0]


# ------------------------------------------------------------------------------ 6. one-line errors
ROWS = [{"id": "a", "prompt": "p", "response": "r é", "reward": 1.0}, {"id": "b", "prompt": "q", "response": "s",
                                                                       "reward": 0.5}]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig"])
def test_utf16_and_bom_files_are_decoded(tmp_path, encoding):
    from lolrl.engine.data import load_jsonl

    path = tmp_path / "train.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS).encode(encoding))
    records = load_jsonl(path)
    assert [r.response for r in records] == ["r é", "s"]


def test_unreadable_files_are_one_line_errors(tmp_path):
    import os

    from lolrl.engine.data import DataError, load_jsonl

    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"id": "a", "prompt": "p", "response": "r", "reward": 1}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid utf-8 text \(byte 0xe9\)"):
        load_jsonl(path)
    with pytest.raises(DataError, match="is a directory, expected a file"):
        load_jsonl(tmp_path)
    if os.geteuid() != 0:  # root reads anything
        path.chmod(0)
        with pytest.raises(DataError, match="permission denied"):
            load_jsonl(path)


def test_reward_that_raises_or_collides_is_named():
    from lolrl.engine.data import DataError, Record
    from lolrl.engine.rewards import RewardOutputError, load_reward
    from lolrl.engine.validation import reward_columns

    reward = load_reward(f"{Path(__file__).resolve().parents[1] / 'bad_rewards.py'}:raises")
    with pytest.raises(RewardOutputError, match=r"'raises' .* raised KeyError: 'score' on batch 0 \(rows 0..1\)"):
        reward(prompts=["a"] * 4, completions=["b"] * 4, batch_size=2)
    with pytest.raises(DataError, match="column named 'desc' collides"):
        reward_columns([Record("x", "p", "r", meta={"desc": "free text"})])


def test_model_folder_without_tokenizer_is_detected(tmp_path, tiny_models):
    import shutil

    from lolrl.engine.modeling import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_models["causal"]) / name, bare / name)
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(str(bare))


def test_non_positive_learning_rate_refused(tmp_path):
    from lolrl.engine.config import OfflineRLConfig
    from lolrl.utils.errors import ConfigError

    for lr in (0.0, -1e-5):
        with pytest.raises(ConfigError, match="learning_rate must be > 0"):
            OfflineRLConfig(model_name="m", output_dir=str(tmp_path), learning_rate=lr)


@pytest.mark.parametrize("field,value,message", [
    ("suffix", ["good", 3], "suffix\\[1\\]': expected a string"),
    ("suffix", ["good", "  "], "suffix\\[1\\]': is empty"),
    ("sft_index", "0", "sft_index': expected an integer"),
    ("sft_index", 1.0, "sft_index': expected an integer"),
    ("sft_index", 2, "sft_index': 2 is out of range"),
    ("reward", [1e308, 0.0], "reward': expected finite numbers"),
])
def test_pro_fields_of_the_wrong_type(tmp_path, field, value, message):
    from lolrl.engine.data import DataError
    from lolrl.tasks.hh.data import read_pro_file

    row = {"prefix": [["<|prompter|>hi", "<|assistant|>"]] * 2, "suffix": ["good", "bad"], "reward": [1.0, 0.0],
           "sft_index": 0}
    path = tmp_path / "pro.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, field: value}) + "\n")
    with pytest.raises(DataError, match=f"pro.jsonl:2: field '{message}"):
        read_pro_file(path)


@pytest.mark.parametrize("text", ['{"../../etc": true}', '{"/abs": true}', '{"a/b/c": true}',
                                  "[" * 50 + "]" * 50, "[" + '"x",' * 5000 + "]"])
def test_aggregation_prefixes_stay_inside_and_flat(text, tmp_path, capsys):
    from lolrl.tasks.paper.aggregate import main as aggregate_main

    code = aggregate_main(["-bmps", text, "-tn", "toy", "-o", str(tmp_path / "t"),
                            "--results_dir", str(tmp_path)])
    assert code == 2 and len(one_line_errors(capsys.readouterr().err)) == 1


# -------------------------------------------------------------------------------- 7. fault injection
def run_killed(args: list[str], fault: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOLRL_FAULT": fault, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = "import sys; from lolrl.tasks.paper.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


@pytest.mark.parametrize("fault", [
    "after_checkpoint_save:2",
    pytest.param("mid_checkpoint_save:3", marks=pytest.mark.slow),
    pytest.param("before_manifest:2", marks=pytest.mark.slow),
])
def test_a_run_killed_at_a_named_point_resumes_to_the_same_parameters(tmp_path, tiny_models, toy_dir,
                                                                      toy_reward_spec, fault):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    extra = ("--save_steps", "1")
    assert main(argv(toy_dir, tiny_models["causal"], whole, toy_reward_spec, *extra)) == 0
    result = run_killed(argv(toy_dir, tiny_models["causal"], killed, toy_reward_spec, *extra), fault)
    assert result.returncode == -9, result.stderr[-2000:]  # SIGKILL: no clean-up ran
    assert (killed / ".lolrl.lock").exists()  # left behind by the killed run: stale
    assert latest_checkpoint(killed / "checkpoints") is not None  # the rerun resumes, it does not start over
    assert main(argv(toy_dir, tiny_models["causal"], killed, toy_reward_spec, *extra)) == 0
    a, b = trainable(whole), trainable(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key
    assert (killed / "eval_results.json").exists() and not (killed / ".lolrl.lock").exists()


# -------------------------------------------------------------------------------------- PPO as well
def test_ppo_stops_on_non_finite_steps_and_respects_the_lock(tmp_path):
    import os
    import socket

    from ppo_toy import MAX_NEW, WORDS, target_word_share, word_model

    from lolrl.engine.data import Record
    from lolrl.engine.generation import GenerationSettings
    from lolrl.engine.rewards import RewardFunction
    from lolrl.online.ppo import PPOConfig, PPOTrainer
    from lolrl.utils.lock import LOCK_NAME, FolderInUseError

    word_model(tmp_path / "lm")
    train = [Record(id=str(i), prompt=" ".join(WORDS[i:i + 3]), response="") for i in range(8)]
    reward = RewardFunction.from_callables(target_word_share)

    def config(out, lr):
        return PPOConfig(model_name=str(tmp_path / "lm"), output_dir=str(out), max_steps=4, learning_rate=lr,
                         rollout_batch_size=4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                         ppo_epochs=2, eval_steps=0, eval_on_start=False, save_steps=-1, max_nonfinite_steps=2,
                         rollout=GenerationSettings(max_new_tokens=MAX_NEW, num_beams=1, do_sample=True))

    with pytest.raises(NonFiniteError, match="PPO: non-finite loss or gradient at 2 steps in a row"):
        PPOTrainer(config(tmp_path / "nan", 1e30), train, [], reward).run()
    assert not (tmp_path / "nan" / "final_adapter").exists()
    held = tmp_path / "held"
    held.mkdir()
    (held / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "x"}))
    with pytest.raises(FolderInUseError, match=f"in use by pid {os.getppid()}"):
        PPOTrainer(config(held, 1e-3), train, [], reward).run()
