"""One dropout setting for every algorithm (issue 22 item 7): off by default, on for all with
--keep_dropout / --disable_dropout False, through the engine's config and every training script's
command line (the generic script, the HH A-LoL, PRO, DPO, PPO and GRPO scripts)."""
from __future__ import annotations

import json

import pytest
import torch

from lolrl.engine.losses import ALGORITHMS, TABLE

KEEP_SPELLINGS = (["--keep_dropout"], ["--no_disable_dropout"], ["--disable_dropout", "False"])


def dropout_rates(model: torch.nn.Module) -> set[float]:
    """Every dropout probability in ``model``: the nn.Dropout modules and Llama-style attention dropout."""
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    return rates | {m.attention_dropout for m in model.modules()
                    if isinstance(getattr(m, "attention_dropout", None), float)}


def any_reward():
    from lolrl.engine.rewards import RewardFunction

    return RewardFunction.from_callables({"length": lambda prompts, completions, **_: [0.0] * len(completions)})


def loaded_policy(config, data):
    from lolrl.engine.trainer import OfflineRLTrainer

    return OfflineRLTrainer(args=config, data=data, reward=any_reward()).model


def test_the_engine_default_is_one_setting_for_every_algorithm(tmp_path):
    from lolrl.engine.config import OfflineRLConfig

    for name, spec in TABLE.items():
        extra = {"group_size": 2} if spec.grouped else {}
        config = OfflineRLConfig(model_name="m", output_dir=str(tmp_path / name), algorithm=name, **extra)
        assert config.disable_dropout is True, name
        assert OfflineRLConfig(model_name="m", output_dir=str(tmp_path / name), algorithm=name, disable_dropout=False,
                               **extra).disable_dropout is False


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_generic_script_loads_every_policy_with_the_same_dropout(tmp_path, tiny_models, toy_dir, toy_reward_spec,
                                                                 algo):
    """Through the script's command line: the loaded policy's dropout is 0 by default for every algorithm
    (nll, pi_ref's own training, included) and the model's own (0.1) with each spelling of the flag."""
    from lolrl.engine.data import load_task_dir
    from lolrl.tasks.paper.cli import parse_args

    data = load_task_dir(toy_dir, need_test=False)
    common = ["-i", str(toy_dir), "-tn", "toy", "--reward", toy_reward_spec, "-m", tiny_models["causal"],
              "-algo", algo, "-t", "--no_test"]
    _, off = parse_args(common + ["-o", str(tmp_path / "off")])
    assert dropout_rates(loaded_policy(off, data)) == {0.0}
    for i, spelling in enumerate(KEEP_SPELLINGS):
        _, on = parse_args(common + ["-o", str(tmp_path / f"on{i}"), *spelling])
        assert on.disable_dropout is False
        if i == 0:
            rates = dropout_rates(loaded_policy(on, data))
            assert rates and min(rates) > 0, rates  # the tiny GPT-2's dropout, 0.1 everywhere


# ------------------------------------------------------------------------------------------ HH scripts
@pytest.fixture
def hh_argv(tmp_path, tiny_models):
    """Common HH flags: the tiny Llama (attention dropout 0) with a new LoRA adapter (LoRA dropout 0.05)
    and tiny PRO files."""
    from hh_tiny import pro_row

    (tmp_path / "train").mkdir()
    rows = [pro_row(("a kind and helpful answer", "go away"), (0.5, -0.5)) for _ in range(4)]
    (tmp_path / "train" / "cleaner_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.json").write_text("".join(json.dumps(pro_row()) + "\n" for _ in range(4)))
    return ["--model_name_or_path", tiny_models["llama"], "--adapter_path", "none", "--lora_r", "2",
            "--train_file_path", str(tmp_path / "train"), "--eval_file_path", str(tmp_path / "dev.json"),
            "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"), "--reward", "none"]


@pytest.mark.parametrize("script", ["lolrl_qlora_llama_hh", "pro_qlora_llama_hh"])
def test_hh_offline_scripts_share_the_setting(hh_argv, script):
    from lolrl.tasks.hh import cli as hh
    from lolrl.tasks.hh.offline import alol_data, pro_data
    from lolrl.tasks.hh.shared import read_hh_files

    alol = script.startswith("lolrl")
    build = alol_data if alol else pro_data
    classes = (hh.ALoLHHData, hh.ALoLHHConfig) if alol else (hh.PROHHData, hh.PROHHConfig)
    algorithms = [a for a in ALGORITHMS if a != "a_lol_kl"] if alol else [None]
    for algo in algorithms:
        chosen = ["--algorithm", algo, "--value_source", "data"] if algo else []
        for extra, rate in (([], 0.0), (["--keep_dropout"], 0.05), (["--disable_dropout", "False"], 0.05)):
            data_args, config = hh.parse_hh(classes, hh_argv + chosen + extra, None)
            data = build(data_args, config, *read_hh_files(data_args))
            assert config.disable_dropout is (rate == 0.0), (algo, extra)
            if algo in (None, "nll", "a_lol"):  # the loaded policy too: PRO, the baseline, an importance-weighted
                assert max(dropout_rates(loaded_policy(config, data))) == rate, (algo, extra)


class _Captured(Exception):
    """Raised by a spy in place of a TRL config or trainer: the test has the settings it wanted."""


def _spy(captured: dict):
    def make(**kwargs):
        captured.update(kwargs)
        raise _Captured
    return make


@pytest.mark.parametrize("keep", [False, True])
def test_dpo_and_grpo_pass_the_setting_to_trl(hh_argv, monkeypatch, keep):
    import trl

    import dpo_qlora_llama_hh
    from lolrl.tasks.hh import dpo, online
    from lolrl.tasks.hh.data import pro_records
    from lolrl.tasks.hh.shared import read_hh_files

    extra = ["--keep_dropout"] if keep else []
    captured: dict = {}
    monkeypatch.setattr(dpo, "dpo_trainer_class", lambda reference_free: _spy(captured))  # DPOTrainer's arguments
    with pytest.raises(_Captured):
        dpo_qlora_llama_hh.main(hh_argv + ["--max_steps", "1"] + extra)
    assert captured["args"].disable_dropout is not keep  # the parsed DPOConfig, as DPOTrainer gets it
    captured.clear()
    monkeypatch.setattr(trl, "GRPOConfig", _spy(captured))
    data, config = online.parse_hh((online.PPOHHData, online.PPOHHConfig), hh_argv + ["--trainer", "grpo"] + extra,
                                   None)
    train = pro_records(read_hh_files(data)[0], data.prompt_format, "sft", "train")
    with pytest.raises(_Captured):
        online.run_trl(config, train, [], any_reward(), str.strip)
    assert captured["disable_dropout"] is not keep


@pytest.mark.parametrize("keep", [False, True])
def test_ppo_policy_and_value_head_follow_the_setting(hh_argv, keep):
    from lolrl.online.ppo import PPOTrainer
    from lolrl.tasks.hh import online
    from lolrl.tasks.hh.data import pro_records
    from lolrl.tasks.hh.shared import read_hh_files

    data, config = online.parse_hh((online.PPOHHData, online.PPOHHConfig),
                                   hh_argv + (["--keep_dropout"] if keep else []), None)
    assert config.disable_dropout is not keep
    train_rows, _ = read_hh_files(data)
    trainer = PPOTrainer(config, pro_records(train_rows, data.prompt_format, "sft", "train"), [], any_reward())
    trainer._load()
    # LoRA's 0.05 and the value head's 0.1 (TRL's) with --keep_dropout (the tiny Llama's attention has 0), none without
    assert dropout_rates(trainer.model) == ({0.0, 0.05, 0.1} if keep else {0.0})
