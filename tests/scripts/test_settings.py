"""Settings: every command line is generated from dataclasses (lolrl.utils.cli); the original's
commands and every original flag/field parse; errors are one line with exit 2; --config YAML round
trip; the optimizer by transformers name with the CPU fallback; the presets under configs/ parse."""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path

import pytest
import torch
from conftest import Merged

from lolrl.tasks.hh import cli as hh
from lolrl.tasks.paper import aggregate, preprocess
from lolrl.tasks.paper import cli as paper
from lolrl.utils.cli import IGNORED, DataclassParser, to_yaml

TESTS = Path(__file__).resolve().parents[1]  # the tests folder: helpers, data

ROOT = Path(__file__).resolve().parents[2]
ORIGINAL_FLAGS = json.loads((TESTS / "original_flags.json").read_text())["scripts"]

HH_SCRIPTS = {"lolrl_qlora_llama_hh.py": (hh.ALoLHHData, hh.ALoLHHConfig),
              "dpo_qlora_llama_hh.py": (hh.DPOHHData, hh.DPOHHConfig),
              "pro_qlora_llama_hh.py": (hh.PROHHData, hh.PROHHConfig),
              "ppo_qlora_llama_hh.py": (hh.PPOHHData, hh.PPOHHConfig),
              "qlora_llama_hh_eval.py": hh.HHEvalArguments, "ppo_hh_eval.py": hh.PPOEvalArguments}
REQUIRED = {"train_generation_task_with_off_policy_PG.py": ["-i", "d", "-tn", "reddit_pos", "-m", "m", "-o", "o"],
            "preprocess_reddit_comment_scores_and_add_rewards.py": ["-i", "d", "-o", "o", "-m", "m"],
            "preprocess_wow_and_add_rewards.py": ["-i", "wow", "-o", "o", "-m", "m"],
            "preprocess_comet_and_add_rewards.py": ["-i", "d", "-it", "t", "-o", "o"],
            "aggregate_generation_task_results.py": ["-bmps", "{'dgpt_nll': True}", "-tn", "wow", "-o", "r.csv"]}


def parse(script: str, argv: list[str]):
    """The settings dataclass ``script`` builds from its required flags and ``argv``."""
    return parse_exactly(script, REQUIRED.get(script, []) + argv)


def parser_of(script: str) -> DataclassParser:
    """The parser ``script``'s main uses."""
    if script in HH_SCRIPTS:
        return hh.settings_parser(HH_SCRIPTS[script])
    return {"train_generation_task_with_off_policy_PG.py": paper.build_parser,
            "aggregate_generation_task_results.py": aggregate.build_parser,
            "preprocess_reddit_comment_scores_and_add_rewards.py": preprocess.reddit_parser,
            "preprocess_wow_and_add_rewards.py": preprocess.dialogue_parser,
            "preprocess_comet_and_add_rewards.py": preprocess.comet_parser}[script]()


def parse_exactly(script: str, argv: list[str]):
    """The settings ``script`` builds from ``argv`` (its own parser, as its main uses it), its dataclasses read as
    one (the task's data settings and the engine's config)."""
    parsed = parser_of(script).parse(argv)
    return Merged(*parsed) if len(parsed) > 1 else parsed[0]


# A value of the original's type for each flag (choices: one the original allowed).
CHOICE_VALUES = {"--algorithm": "a_lol", "--learning_algorithm": "a_lol", "--sampling_strategy": "good_priority",
                 "--report_to": "none",
                 "--optim": "adamw_torch", "--lr_scheduler_type": "linear", "--quant_type": "nf4",
                 "--input_task": "faithdial", "--task_name": "faithdial", "--reward_function": "unit"}


def value_for(flag: str, typ: str):
    """(argv tokens, expected parsed value)."""
    if typ == "'store_true'":
        return [], True
    if "bool" in typ:
        return ["False"], False
    if "float" in typ:
        return ["0.5"], 0.5
    if "int" in typ:
        return ["3"], 3
    text = CHOICE_VALUES.get(flag, "some_value")
    return [text], text


CASES = [(script, flags, typ) for script, rows in ORIGINAL_FLAGS.items() if script in {**HH_SCRIPTS, **REQUIRED}
         for flags, typ in rows]


def test_every_original_script_is_covered():
    assert set(ORIGINAL_FLAGS) == set(HH_SCRIPTS) | set(REQUIRED)
    assert len(CASES) > 250


# Flags that need another one to mean anything: --kl_beta is A-LoL KL's (refused with another algorithm).
CONTEXT = {("lolrl_qlora_llama_hh.py", "--kl_beta"): ["--algorithm", "a_lol_kl"],
           ("train_generation_task_with_off_policy_PG.py", "--kl_beta"): ["-algo", "a_lol_kl"],
           # priority sampling needs rewards: the baseline nll (the default) refuses it
           ("train_generation_task_with_off_policy_PG.py", "--train_sampling"): ["-algo", "wbc"],
           ("lolrl_qlora_llama_hh.py", "--sampling_strategy"): ["--algorithm", "a_lol"],
           # PPO's rollout batch must be a multiple of the mini-batch x accumulation (checked as the config is parsed)
           ("ppo_qlora_llama_hh.py", "--per_device_train_batch_size"): ["--ppo_rollout_batch_size", "12"],
           ("ppo_qlora_llama_hh.py", "--gradient_accumulation_steps"): ["--ppo_rollout_batch_size", "12"],
           ("ppo_qlora_llama_hh.py", "--ppo_rollout_batch_size"): ["--per_device_train_batch_size", "1",
                                                                   "--gradient_accumulation_steps", "1"]}
# What a flag's value becomes: -ts is priority sampling; report_to is TrainingArguments' list.
WANT = {"--train_sampling": "good_priority"}


@pytest.mark.parametrize("script, flags, typ", CASES, ids=[f"{c[0]}:{c[1][-1]}" for c in CASES])
def test_every_original_flag_parses_with_its_value(script, flags, typ, capsys):
    """Each spelling (short and long) with a value of the original's type parses into the field it names (an alias
    into the field it stands for: -bs into per_device_train_batch_size); an ignored one leaves the default."""
    parser = parser_of(script)
    for flag in flags:
        tokens, want = value_for(flags[-1], typ)
        argv = [*REQUIRED.get(script, []), *CONTEXT.get((script, flags[-1]), []), flag, *tokens]
        if flags[-1] == "--baseline_update_threshold":  # parsed, and refused: the reference policy stays fixed
            with pytest.raises(SystemExit) as stop:
                parser.parse(argv)
            assert stop.value.code == 2 and "not supported" in capsys.readouterr().err
            continue
        parsed = parser.parse(argv)
        name = parser.field_of(flag)
        got = parser.value(parsed, name)
        meta = parser.fields[name].field.metadata
        if meta.get("ignored") or name in parser.ignore:
            want = parser.fields[name].default
        want = WANT.get(flags[-1], want)
        if name == "report_to" and isinstance(got, list):  # TrainingArguments' list: "none" is no tracker
            want = [] if want == "none" else [want]
        if name == "total_steps":  # the PPO script's one budget, also read as max_steps
            assert parser.value(parsed, "max_steps") == want
        if name in ("input_task", "task_name"):
            want = want.lower()
        assert got == want, (script, flag, got, want)


def test_original_bool_syntax():
    """`--flag False`, `--flag` alone and `--no_flag` (for fields on by default), as HfArgumentParser."""
    assert parse("dpo_qlora_llama_hh.py", ["--reference_free", "True"]).reference_free is True
    assert parse("dpo_qlora_llama_hh.py", ["--reference_free"]).reference_free is True
    assert parse("dpo_qlora_llama_hh.py", []).reference_free is False
    assert parse("lolrl_qlora_llama_hh.py", ["--gradient_checkpointing", "True"]).activation_checkpointing is True
    assert parse("lolrl_qlora_llama_hh.py", ["--gradient_checkpointing", "False"]).activation_checkpointing is False
    assert parse("lolrl_qlora_llama_hh.py", ["--double_quant", "True"]).quantization.double_quant is True
    assert parse("lolrl_qlora_llama_hh.py", ["--no_double_quant"]).quantization.double_quant is False
    assert parse("ppo_qlora_llama_hh.py", ["--no_adap_kl_ctrl"]).adap_kl_ctrl is False
    assert parse("lolrl_qlora_llama_hh.py", ["--lora_alpha", "8.0"]).lora.alpha == 8.0


ORIGINAL_COMMANDS = [  # the original README's command patterns
    ("train_generation_task_with_off_policy_PG.py",
     "-i data/reddit_comment_scores_kaggle/preprocessed -tn reddit_pos -m microsoft/DialoGPT-medium "
     "-s saved_models/reddit_pos/dgpt_nll -o final_results/reddit_pos/dgpt_nll -algo nll -vf 2 -e 6 -t -bs 8 -as 2 "
     "-v_bs 32"),
    ("train_generation_task_with_off_policy_PG.py",
     "-i data/reddit_comment_scores_kaggle/preprocessed -tn reddit_pos -m saved_models/reddit_pos/dgpt_nll "
     "-s saved_models/reddit_pos/dgpt_a_lol -o final_results/reddit_pos/dgpt_a_lol -algo a_lol -vf 2 -e 3 -bs 8 "
     "-as 2 -v_bs 32 -t -ev_b"),
    ("train_generation_task_with_off_policy_PG.py",
     "-i data/comet -tn COMET -m comet-distill -mt comet-distill-tokenizer -s saved_models/COMET/a_lol "
     "-o final_results/COMET/a_lol -algo a_lol -ml 30 -vf 16 -e 1 -bs 16 -as 1 -v_bs 32 -t -ev_b"),
    ("lolrl_qlora_llama_hh.py", "--algorithm a_lol --sampling_strategy good_priority --ppo_clip 0.9 "
                                "--output_dir checkpoints/a_lol --cache_dir cache/a_lol"),
    ("lolrl_qlora_llama_hh.py", "--algorithm a_lol --kl_beta 0.1 --ppo_clip 0.0 --output_dir checkpoints/a_lol_kl"),
    ("lolrl_qlora_llama_hh.py", "--algorithm a_lol_seq --sampling_strategy None --output_dir checkpoints/a_lol_seq"),
    ("dpo_qlora_llama_hh.py", "--output_dir checkpoints/dpo --reference_free False"),
    ("pro_qlora_llama_hh.py", "--output_dir checkpoints/pro --sft_weight 0.05"),
    ("ppo_qlora_llama_hh.py", "--output_dir checkpoints/ppo_qlora_llama --cache_dir cache/ppo --total_steps 6000"),
    ("qlora_llama_hh_eval.py", "--adapter_path abaheti95/a_lol_good_prioirty_qlora_hh --output_dir outputs/a_lol"),
    ("ppo_hh_eval.py", "--model_name_or_path reciprocate/ppo_hh_pythia-6B --output_dir outputs/ppo"),
    ("preprocess_reddit_comment_scores_and_add_rewards.py", "-pd -bs 16"),
    ("preprocess_wow_and_add_rewards.py", "-bs 16"),
    ("preprocess_comet_and_add_rewards.py", "-bs 16"),
]


@pytest.mark.parametrize("script, command", ORIGINAL_COMMANDS)
def test_original_commands_parse(script, command):
    config = parse(script, command.split())
    assert all(dataclasses.is_dataclass(part) for part in getattr(config, "parts", [config]))


def test_original_commands_mean_what_they_meant():
    a_lol = parse(*ORIGINAL_COMMANDS[1][:1], ORIGINAL_COMMANDS[1][1].split())
    assert (a_lol.algorithm, a_lol.num_train_epochs, a_lol.per_device_train_batch_size,
            a_lol.gradient_accumulation_steps) == ("a_lol", 3, 8, 2)
    assert a_lol.do_train and a_lol.eval_on_start and a_lol.per_device_eval_batch_size == 32
    kl = parse("lolrl_qlora_llama_hh.py", ORIGINAL_COMMANDS[4][1].split())
    assert (kl.algorithm, kl.kl_beta, kl.ppo_clip) == ("a_lol_kl", 0.1, 0.0)
    ppo = parse("ppo_qlora_llama_hh.py", ORIGINAL_COMMANDS[8][1].split())
    assert ppo.max_steps == 6000


@pytest.mark.parametrize("script", list(HH_SCRIPTS) + list(REQUIRED))
def test_help_labels_the_ignored_fields(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(script, ["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if script in HH_SCRIPTS:
        assert "--max_memory_MB MAX_MEMORY_MB " + IGNORED in text
        assert "--block_size BLOCK_SIZE " + IGNORED in text


def test_eval_scripts_label_training_fields_ignored(capsys):
    with pytest.raises(SystemExit):
        parse("qlora_llama_hh_eval.py", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--learning_rate LEARNING_RATE " + IGNORED in text
    assert "--per_device_eval_batch_size PER_DEVICE_EVAL_BATCH_SIZE " + IGNORED not in text


@pytest.mark.parametrize("script, argv, message", [
    ("lolrl_qlora_llama_hh.py", ["--max_steps", "ten"], "argument --max_steps: expected an integer, got 'ten'"),
    ("lolrl_qlora_llama_hh.py", ["--learning_rate", "fast"], "argument --learning_rate: expected a number"),
    ("lolrl_qlora_llama_hh.py", ["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
    ("lolrl_qlora_llama_hh.py", ["--per_device_train_batch_size", "0"],
     "argument --per_device_train_batch_size: expected a value >= 1, got 0"),
    ("lolrl_qlora_llama_hh.py", ["--algorithm", "ppo"],
     "argument --algorithm/-algo/--learning_algorithm: invalid choice: 'ppo'"),
    ("dpo_qlora_llama_hh.py", ["--reference_free", "maybe"], "expected a boolean"),
    ("train_generation_task_with_off_policy_PG.py", ["-bs", "x"],
     "argument --per_device_train_batch_size/-bs/--batch_size: expected an integer"),
    ("train_generation_task_with_off_policy_PG.py", ["-c", "-0.1"],
     "argument --ppo_clip/-c: expected a value in [0.0, 1.0]"),
    ("preprocess_wow_and_add_rewards.py", ["-i", "nope"], "argument --input_task/-i: expected one of"),
])
def test_bad_flags_are_one_line_and_exit_2(script, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(script, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err


def test_ppo_clip_zero_and_none():
    assert parse("train_generation_task_with_off_policy_PG.py", ["-c", "0"]).ppo_clip == 0.0
    assert parse("train_generation_task_with_off_policy_PG.py", ["-c", "none"]).ppo_clip is None
    assert parse("train_generation_task_with_off_policy_PG.py", []).ppo_clip == 0.9
    assert parse("lolrl_qlora_llama_hh.py", ["--ppo_clip", "none"]).ppo_clip is None
    assert parse("lolrl_qlora_llama_hh.py", ["--reward", "none"]).reward == "none"  # text stays text


# ------------------------------------------------------------------------------------------ --config
@pytest.mark.parametrize("script, command", ORIGINAL_COMMANDS[:11])
def test_config_round_trip(tmp_path, script, command):
    """CLI -> config -> YAML -> config: equal."""
    first = parse(script, command.split())
    path = tmp_path / "run.yaml"
    to_yaml(*getattr(first, "parts", [first]), path=path)
    again = parse_exactly(script, ["--config", str(path)])
    assert again == first


def test_command_line_wins_over_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-5\nalgorithm: a_lol\nmax_steps: 50\n")
    config = parse("lolrl_qlora_llama_hh.py", ["--config", str(path), "--max_steps", "7"])
    assert (config.learning_rate, config.algorithm, config.max_steps) == (1e-5, "a_lol", 7)


def test_config_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rat: 1e-5\n")
    with pytest.raises(SystemExit) as exit_:
        parse("lolrl_qlora_llama_hh.py", ["--config", str(path)])
    assert exit_.value.code == 2
    assert "unknown setting 'learning_rat'" in capsys.readouterr().err


def test_config_values_are_checked_like_flags(tmp_path, capsys):
    for text, message in (("algorithm: ppo\n", "invalid choice: 'ppo'"),
                          ("max_steps: ten\n", "max_steps: expected an integer, got 'ten'"),
                          ("per_device_train_batch_size: 0\n", "expected a value >= 1, got 0")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(SystemExit) as exit_:
            parse("lolrl_qlora_llama_hh.py", ["--config", str(path)])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_config_supplies_required_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input_dir: d\ntask_name: wow\nmodel_name: m\noutput_dir: o\nlearning_algorithm: a_lol\n")
    args, config = paper.build_parser().parse(["--config", str(path), "-e", "2"])  # YAML keys: names or long aliases
    assert (args.input_dir, config.algorithm, config.num_train_epochs) == ("d", "a_lol", 2)
    assert not config.ppo_clip_given


PRESETS = sorted((ROOT / "configs").glob("**/*.yaml"))


def test_presets_exist():
    names = {p.stem for p in PRESETS}
    for task in ("reddit_pos", "reddit_neg", "wow", "faithdial", "faithdial_wow", "comet"):
        assert {f"{task}_nll", f"{task}_a_lol"} <= names, task
    assert {"hh_a_lol", "hh_dpo", "hh_pro", "hh_ppo", "demo"} <= names


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.parent.name in ("paper", "hh")], ids=lambda p: p.stem)
def test_presets_parse(preset):
    script = {"paper": "train_generation_task_with_off_policy_PG.py"}.get(preset.parent.name)
    if script is None:
        script = {"hh_a_lol": "lolrl_qlora_llama_hh.py", "hh_dpo": "dpo_qlora_llama_hh.py",
                  "hh_pro": "pro_qlora_llama_hh.py", "hh_ppo": "ppo_qlora_llama_hh.py"}[preset.stem.split("-")[0]]
        config = parse(script, ["--config", str(preset)])
    else:
        config = Merged(*paper.parse_args(["--config", str(preset)]))
    assert all(dataclasses.is_dataclass(part) for part in getattr(config, "parts", [config]))


# ------------------------------------------------------------------------------------------ optimizer
def test_optimizer_falls_back_on_cpu_with_one_warning(caplog, monkeypatch):
    from lolrl.engine import optim

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(optim, "_warned", set())
    model = torch.nn.Linear(4, 3)
    with caplog.at_level(logging.WARNING, logger="lolrl.engine.optim"):
        first = optim.build_optimizer(model, "paged_adamw_32bit", 2e-4, (0.9, 0.999), 1e-6, 0.01)
        optim.build_optimizer(model, "paged_adamw_32bit", 2e-4, (0.9, 0.999), 1e-6, 0.01)
    assert type(first) is torch.optim.AdamW
    assert first.defaults["eps"] == 1e-6 and first.defaults["betas"] == (0.9, 0.999) and first.defaults["lr"] == 2e-4
    decay, no_decay = first.param_groups  # the weight matrix decays, the bias does not
    assert decay["weight_decay"] == 0.01 and decay["params"][0] is model.weight
    assert no_decay["weight_decay"] == 0.0 and no_decay["params"][0] is model.bias
    warnings = [r for r in caplog.records if "paged_adamw_32bit" in r.getMessage()]
    assert len(warnings) == 1 and "adamw_torch" in warnings[0].getMessage() and "paged" in warnings[0].getMessage()


def test_optimizer_names_are_transformers_names():
    from lolrl.engine.config import OfflineRLConfig
    from lolrl.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="--optim: unknown optimizer 'adamw_fast'"):
        OfflineRLConfig(model_name="m", output_dir="o", optim="adamw_fast")
    assert OfflineRLConfig(model_name="m", output_dir="o").optim == "adamw_torch"


def test_hh_defaults_are_the_originals_effective_optimizer():
    from lolrl.utils.cli import default_of

    assert default_of(hh.HHTraining, "optim") == "paged_adamw_32bit"
    config = parse("lolrl_qlora_llama_hh.py", [])
    paged = "paged_adamw_32bit" if torch.cuda.is_available() else "adamw_torch"  # its CPU fallback, with a warning
    assert (config.optim, config.adam_epsilon, config.adam_beta1, config.adam_beta2) == (paged, 1e-6, 0.9, 0.999)
    assert config.weight_decay == 0.01  # bitsandbytes' default, which the original's optimizer got
    paper_config = parse("train_generation_task_with_off_policy_PG.py", [])
    assert (paper_config.optim, paper_config.adam_epsilon, paper_config.weight_decay) == ("adamw_torch", 1e-8, 0.01)


def test_demo_preset_parses():
    from lolrl.demo.cli import DemoArguments

    config = DataclassParser(DemoArguments).parse_one(["--config", str(ROOT / "configs" / "demo.yaml")])
    assert (config.model, config.algorithms) == ("tiny", "a_lol,wbc")


def test_ppo_total_steps_and_max_steps_are_one_setting(capsys):
    """--max_steps (HF's name) and --total_steps (the original's) set one PPO step count; disagreeing is refused."""
    script = "ppo_qlora_llama_hh.py"
    assert (parse(script, []).total_steps, parse(script, []).max_steps) == (1000, 1000)
    assert parse(script, ["--max_steps", "7"]).total_steps == 7
    assert parse(script, ["--total_steps", "5"]).max_steps == 5
    assert parse(script, ["--total_steps", "5", "--max_steps", "5"]).total_steps == 5
    with pytest.raises(SystemExit) as stop:
        parse(script, ["--total_steps", "5", "--max_steps", "6"])
    assert stop.value.code == 2 and "disagree" in capsys.readouterr().err


def test_converter_command_line_is_generated_and_takes_a_preset(tmp_path, capsys):
    from lolrl.tasks.paper import comet_convert

    parser = comet_convert.build_parser()
    assert isinstance(parser, DataclassParser)
    args = parser.parse_one(["-i", "critic.npz", "-o", "out", "--roberta_config", "roberta-base"])
    assert (args.keras_model, args.output_dir, args.roberta_config, args.tokenizer) == (
        "critic.npz", "out", "roberta-base", None)
    preset = tmp_path / "convert.yaml"
    preset.write_text("roberta_config: roberta-base\ndump_npz: weights.npz\n")
    args = parser.parse_one(["--config", str(preset), "-o", "elsewhere"])
    assert (args.roberta_config, args.dump_npz, args.output_dir) == ("roberta-base", "weights.npz", "elsewhere")
    assert args.keras_model == comet_convert.ORIGINAL_KERAS_DIR
    with pytest.raises(SystemExit) as stop:
        parser.parse_one(["--bogus", "1"])
    assert stop.value.code == 2 and "--bogus" in capsys.readouterr().err


# A sentence that names an estimator as a_lol_kl's default: "(default `k3`)", "defaults to the k3 estimator",
# "``k1`` (the default)", "`--kl_estimator k3` (non-negative), the default".
_DEFAULT_ESTIMATOR = (r"\bdefault(?:s| estimator)?[^.;|\n]{0,20}?\b(k[123])\b",
                      r"\b(k[123])\b[^.;|\n]{0,30}?\bthe default\b")


def test_every_page_names_the_engines_default_kl_estimator():
    """Docs, README, docstrings and --help texts that name a_lol_kl's default KL estimator name the code's."""
    import re

    from lolrl.engine.config import OfflineRLConfig

    default = dataclasses.fields(OfflineRLConfig)
    default = next(f.default for f in default if f.name == "kl_estimator")
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "lolrl").rglob("*.py"))]
    claims = [(path.relative_to(ROOT).as_posix(), match.group(1))
              for path in texts for pattern in _DEFAULT_ESTIMATOR
              for match in re.finditer(pattern, path.read_text(encoding="utf-8"))]
    assert any(name == "docs/own-data.md" for name, _ in claims)  # the patterns do find the pages' claims
    assert [c for c in claims if c[1] != default] == []
    help_text = paper.build_parser().format_help()
    entry = help_text[help_text.index("\n  --kl_estimator"):].split("\n  --")[1]
    assert f"(default: {default})" in " ".join(entry.split())


# ------------------------------------------------------------------------------------------ one definition
OFFLINE_SCRIPTS = ("train_generation_task_with_off_policy_PG.py", "lolrl_qlora_llama_hh.py", "pro_qlora_llama_hh.py")


@pytest.mark.parametrize("script", OFFLINE_SCRIPTS)
def test_every_config_field_is_a_flag_of_every_offline_script(script):
    """The offline scripts parse straight into the engine's config: each field of OfflineRLConfig a command line
    can give (nested LoRA / quantisation / decoding settings as flat flags) is a flag of each, with no copy."""
    from lolrl.engine.config import OfflineRLConfig

    parser = parser_of(script)
    config_class = next(t for t in parser.types if issubclass(t, OfflineRLConfig))
    assert dataclasses.fields(config_class)  # the script's config restates defaults, declares no copy
    for f in dataclasses.fields(OfflineRLConfig):
        if not f.init or f.metadata.get("hidden_field"):
            continue
        prefix = f.metadata.get("flatten")
        names = ([prefix + sub.name for sub in dataclasses.fields(f.default_factory())] if prefix is not None
                 else [f.name])
        owners = {parser.fields[n].owner for n in names if n in parser.fields}
        if f.name in parser.fields or owners:
            assert owners <= {config_class}, (script, f.name)
        else:  # only fields of types no command line gives (e.g. a ParallelismConfig) are left out
            from lolrl.utils.cli import _field_type

            hint = typing.get_type_hints(OfflineRLConfig)[f.name]
            assert not dataclasses.is_dataclass(hint) and _field_type(hint) is None, (script, f.name)


def test_no_script_translates_settings_by_hand():
    """No task module or script builds a trainer's config from its own settings (the old config_from_args,
    offline_config, ppo_config, the hand-built DPOConfig): they parse into it."""
    import re

    sources = [*sorted((ROOT / "lolrl" / "tasks").rglob("*.py")), *sorted(ROOT.glob("*.py"))]
    pattern = r"\b(OfflineRLConfig|PPOConfig|DPOConfig)\(|\bdef (config_from_args|offline_config|ppo_config)\b"
    calls = [(p.name, m.group(0)) for p in sources for m in re.finditer(pattern, p.read_text())]
    assert calls == []


def test_yaml_keys_may_be_the_original_long_flags(tmp_path):
    """A preset written with the original's names (batch_size, learning_algorithm, n_epochs, train) reads into the
    config's fields, nested settings by their flags' names."""
    path = tmp_path / "c.yaml"
    path.write_text("input_dir: d\ntask_name: wow\nmodel_name: m\noutput_dir: o\nbatch_size: 4\n"
                    "learning_algorithm: wbc\nn_epochs: 2\ntrain: true\nlora_r: 8\nnum_beams: 3\n")
    args, config = paper.build_parser().parse(["--config", str(path)])
    assert (config.per_device_train_batch_size, config.algorithm, config.num_train_epochs, config.do_train) == (
        4, "wbc", 2, True)
    assert (config.lora.r, config.generation.num_beams) == (8, 3)


def test_ppo_and_dpo_parse_straight_into_their_configs():
    """The online scripts parse into their trainers' configs, with no translation: PPO's config is a
    TrainingArguments with the offline names (the original's flags its aliases), DPO's is TRL's DPOConfig."""
    import transformers
    import trl

    from lolrl.online.ppo import PPOConfig
    from lolrl.tasks.hh import online

    assert issubclass(PPOConfig, transformers.TrainingArguments)
    assert "PPOConfig(" not in Path(online.__file__).read_text()  # no config built by hand from other settings
    ppo = parse("ppo_qlora_llama_hh.py", ["--ppo_clip", "0.3", "--kl_beta", "0.1", "--ppo_rollout_batch_size", "32",
                                          "--top_p", "0.9", "--max_new_tokens", "64", "--no_resume",
                                          "--per_device_train_batch_size", "8", "--adam_epsilon", "1e-5"])
    assert isinstance(ppo.parts[1], hh.PPOHHConfig) and isinstance(ppo.parts[1], PPOConfig)
    assert (ppo.cliprange, ppo.init_kl_coef, ppo.rollout_batch_size, ppo.resume) == (0.3, 0.1, 32, "never")
    assert (ppo.rollout.top_p, ppo.rollout.top_k, ppo.rollout.do_sample, ppo.rollout.max_new_tokens) == (0.9, 50, True,
                                                                                                         64)
    assert (ppo.validation.do_sample, ppo.validation.max_new_tokens, ppo.validation.stop_texts) == (False, 64,
                                                                                                    [" ###"])
    assert (ppo.per_device_train_batch_size, ppo.adam_epsilon, ppo.learning_rate, ppo.max_grad_norm) == (8, 1e-5,
                                                                                                         2e-5, 0.0)
    dpo = parse("dpo_qlora_llama_hh.py", ["--beta", "0.2", "--reference_free", "--pair_order", "first"])
    assert isinstance(dpo.parts[1], trl.DPOConfig) and isinstance(dpo.parts[1], hh.DPOHHConfig)
    assert (dpo.beta, dpo.reference_free, dpo.precompute_ref_log_probs, dpo.pair_order) == (0.2, True, False, "first")
    assert (dpo.per_device_train_batch_size, dpo.gradient_accumulation_steps, dpo.loss_type) == (2, 8, ["sigmoid"])
    assert parse("dpo_qlora_llama_hh.py", []).precompute_ref_log_probs is True
