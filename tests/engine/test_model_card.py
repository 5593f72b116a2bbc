"""The saved model's card (README.md), --push_to_hub (the hub calls, monkeypatched: no network here) and
--report_to tensorboard (event files, read back)."""
import json
import sys
from pathlib import Path

import pytest
from conftest import status_of

from lolrl.engine.model_card import (
    CITATION,
    TOKEN_SHOWN,
    CardContents,
    command_line,
    render_card,
)
from lolrl.tasks.paper.cli import main

ROOT = Path(__file__).parents[2]
SECRET = "hf_secret_token_value"


def args_for(toy_dir, model, out, reward, *extra, algo="a_lol"):
    """tests/scripts/test_generic_script.py's short run (two optimizer steps); A-LoL's value head in closed form
    (quick)."""
    return ["-i", str(toy_dir), "-tn", "toy", "--reward", reward, "-m", model, "-o", str(out), "-algo", algo,
            "-t", "-e", "1", "-bs", "8", "-v_bs", "16", "-ml", "10", "--max_steps", "2", "-vf", "1",
            "--num_beams", "1", "-lr", "1e-3", "--value_head", "ridge", *extra]


def front_matter(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


class FakeHub:
    """huggingface_hub.HfApi as the trainer uses it: records each call and what the folder held at upload time."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None, **kwargs):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "token": self.token}))
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        FakeHub.calls.append(("upload_folder", {"repo_id": repo_id, "folder": folder, "files": files,
                                                "card": (folder / "README.md").read_text(),
                                                "ignore_patterns": ignore_patterns}))


# ------------------------------------------------------------------------------------ fast lane
def test_card_front_matter_settings_and_citation():
    card = CardContents(base_model="openai-community/gpt2", algorithm="a_lol", trainer="OfflineRLTrainer",
                        settings={"algorithm": "a_lol", "importance weight clip (ppo_clip)": 0.9,
                                  "learning_rate": 2e-5}, adapter=True, task="reddit_pos",
                        rows={"train": 100, "validation": 10, "test": 5}, data_digest="abc123",
                        best={"step": 40, "metric": "final_reward", "measure": 0.5},
                        command=command_line(["/home/me/train.py", "-algo", "a_lol", "--hub_token", SECRET]))
    text = render_card(card, "my-model")
    meta = front_matter(text)
    assert meta["base_model"] == "openai-community/gpt2" and meta["library_name"] == "peft"
    assert {"lolrl", "a-lol", "offline-rl", "trl-style", "lora"} <= set(meta["tags"])
    assert "| importance weight clip (ppo_clip) | 0.9 |" in text and "| learning_rate | 2e-05 |" in text
    assert "- train rows: 100" in text and "`abc123`" in text
    assert "Best validation final_reward: 0.5 at optimizer step 40" in text
    assert f"train.py -algo a_lol --hub_token '{TOKEN_SHOWN}'" in text and SECRET not in text and "/home/me" not in text
    assert CITATION in text and "Leftover Lunch" in text and "ICLR" in text
    # a local starting model: no base_model in the front matter, and no path of the user's machine in the card
    local = render_card(CardContents(base_model="/home/me/models/tiny", algorithm="nll", trainer="OfflineRLTrainer",
                                     settings={}), "m")
    assert "base_model" not in front_matter(local) and "/home/me" not in local and "`tiny`" in local


def test_push_to_hub_refused_offline_before_anything_loads(tmp_path, toy_dir, toy_reward_spec, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    argv = args_for(toy_dir, str(tmp_path / "no_model_needed"), out, toy_reward_spec, "--push_to_hub")
    assert status_of(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --push_to_hub") and "HF_HUB_OFFLINE" in err and len(err.splitlines()) == 1
    assert not (out / "args.json").exists()  # refused before the run started


@pytest.mark.parametrize("tracker, message", [("nope", "unknown tracker 'nope'"),
                                               ("tensorboard", "its package is not installed")])
def test_report_to_refused_when_it_would_log_nowhere(tmp_path, toy_dir, toy_reward_spec, capsys, monkeypatch,
                                                      tracker, message):
    import accelerate.tracking

    if tracker == "tensorboard":  # Accelerate drops a tracker whose package is missing without a word
        monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    argv = args_for(toy_dir, str(tmp_path / "m"), tmp_path / "o", toy_reward_spec, "--report_to", tracker)
    assert status_of(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --report_to") and message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------ training runs
@pytest.mark.slow
def test_card_with_results_and_push_of_the_save_folder(tmp_path, tiny_models, toy_dir, toy_reward_spec, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    out, saved = tmp_path / "out", tmp_path / "saved"
    argv = args_for(toy_dir, tiny_models["causal"], out, toy_reward_spec, "-s", str(saved), "--push_to_hub",
                    "--hub_model_id", "me/tiny-alol", "--hub_token", SECRET, "--hub_private_repo")
    monkeypatch.setattr(sys, "argv", ["train_generation_task_with_off_policy_PG.py", *argv])
    assert main(argv) == 0

    card = (saved / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and {"lolrl", "a-lol", "trl-style"} <= set(meta["tags"])
    assert "| algorithm | a_lol |" in card and "| sampling_strategy | good_priority |" in card
    assert "| value_head | ridge |" in card and "| learning_rate | 0.001 |" in card
    assert "- train rows: 48" in card and "- validation rows: 12" in card and "- test rows: 8" in card
    best = json.loads((saved / "best.json").read_text())
    assert f"at optimizer step {best['step']}" in card
    results = json.loads((out / "eval_results.json").read_text())
    assert "| val/generated |" in card and "| test/generated |" in card
    assert f"{results['test/generated']['final_reward']:.4f}" in card  # the final test metrics, as eval_results.md
    assert "train_generation_task_with_off_policy_PG.py -i" in card and "-algo a_lol" in card
    assert SECRET not in card and TOKEN_SHOWN in card and CITATION in card
    assert SECRET not in (out / "args.json").read_text()  # the token is nowhere on disk

    (create, create_args), (upload, upload_args) = FakeHub.calls
    assert (create, upload) == ("create_repo", "upload_folder")
    assert create_args == {"repo_id": "me/tiny-alol", "private": True, "token": SECRET}
    assert upload_args["repo_id"] == "me/tiny-alol" and upload_args["folder"] == saved
    assert upload_args["card"] == card  # uploaded with the final card
    assert {"README.md", "model.safetensors", "config.json", "best.json"} <= upload_args["files"]
    assert ".*" in upload_args["ignore_patterns"]  # the run's lock file stays home

    # checkpoints verify as before (the card is in the save folder, not in a checkpoint's manifest)
    from lolrl.utils.checkpoint import hf_checkpoints
    from lolrl.utils.manifest import verify_manifest

    found = hf_checkpoints(out / "checkpoints")
    assert found and all("README.md" not in verify_manifest(c)["files"] for c in found)


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    assert main(args_for(toy_dir, tiny_models["causal"], out, toy_reward_spec, "--report_to", "tensorboard",
                         "--logging_steps", "1", "-ev_b", algo="wbc")) == 0
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events
    scalars: dict[str, list] = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = sorted(scalars["train/loss"])
    assert [s for s, _ in logged] == [e["step"] for e in log] == [1, 2]
    assert [v for _, v in logged] == pytest.approx([e["loss"] for e in log], rel=1e-6)  # float32 in the event file
    # every validation, the starting model's at step 0 (-ev_b) included, under the Trainer's eval/ prefix
    validations = [json.loads(line) for line in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert sorted(s for s, _ in scalars["eval/final_reward"]) == [v["step"] for v in validations] == [0, 2]


@pytest.mark.slow
def test_ppo_best_adapter_gets_a_card_and_is_pushed(hh_fixture, monkeypatch):
    """The HH PPO script (lolrl's PPOTrainer): the same card and upload for OUTPUT/best_adapter."""
    import huggingface_hub

    sys.path.insert(0, str(ROOT))
    from ppo_qlora_llama_hh import main as ppo_main

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    tmp_path, args = hh_fixture
    out = tmp_path / "out"
    assert ppo_main(args + ["--output_dir", str(out), "--total_steps", "1", "--eval_steps", "1", "--push_to_hub"]) == 0
    best = out / "best_adapter"
    card = (best / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and {"lolrl", "ppo", "lora"} <= set(meta["tags"])
    assert "| algorithm | ppo |" in card and "| cliprange | 0.2 |" in card and "- train prompts rows: 8" in card
    assert f"at optimizer step {json.loads((best / 'best.json').read_text())['step']}" in card
    (_, create_args), (_, upload_args) = FakeHub.calls
    assert create_args["repo_id"] == "out" and upload_args["folder"] == best and upload_args["card"] == card
    assert {"README.md", "adapter_model.safetensors", "value_head.safetensors"} <= upload_args["files"]
