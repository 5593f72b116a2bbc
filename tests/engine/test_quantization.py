"""4-bit loading (issue 22, items 9 and 12): the HH scripts load with the original's numerics (its
BitsAndBytesConfig: NF4, no double quantisation, fp16 compute; no prepare_model_for_kbit_training),
every quantisation setting is a flag, and every setting that changes pi_ref's numbers is in the keys
of the caches of its outputs. bitsandbytes needs CUDA: here the 4-bit path is exercised with
``can_load_in_4bit`` patched and the quantisation config captured where ``from_pretrained`` gets it."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import Merged, parse_settings

from lolrl.engine import modeling
from lolrl.engine.config import OfflineRLConfig
from lolrl.engine.modeling import (
    LoraSettings,
    QuantizationSettings,
    bnb_4bit_kwargs,
    numerics_key,
)
from lolrl.tasks.hh import cli as hh

# The original's 4-bit load (all six HH scripts): BitsAndBytesConfig(load_in_4bit=True,
# bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16); double quantisation commented out.
ORIGINAL_BNB = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False,
                "bnb_4bit_compute_dtype": torch.float16}
HH_SCRIPTS = {"lolrl_qlora_llama_hh.py": (hh.ALoLHHData, hh.ALoLHHConfig),
              "dpo_qlora_llama_hh.py": (hh.DPOHHData, hh.DPOHHConfig),
              "pro_qlora_llama_hh.py": (hh.PROHHData, hh.PROHHConfig),
              "ppo_qlora_llama_hh.py": (hh.PPOHHData, hh.PPOHHConfig),
              "qlora_llama_hh_eval.py": hh.HHEvalArguments, "ppo_hh_eval.py": hh.PPOEvalArguments}


@pytest.fixture
def fake_4bit(monkeypatch):
    """4-bit loading 'available': ``from_pretrained``'s quantisation arguments are recorded and the plain
    model loads; peft's prepare_model_for_kbit_training is recorded (and leaves the model)."""
    import peft
    from transformers import AutoModelForCausalLM

    seen = {"configs": [], "prepared": 0}
    plain = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, name, **kwargs):
        if "quantization_config" in kwargs:
            seen["configs"].append(kwargs.pop("quantization_config"))
            kwargs.pop("device_map")
        return plain(cls, name, **kwargs)

    def prepare(model, **kwargs):
        seen["prepared"] += 1
        return model

    monkeypatch.setattr(modeling, "can_load_in_4bit", lambda: True)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    return seen


def bnb_fields(config) -> dict:
    """The fields of a transformers ``BitsAndBytesConfig`` that ORIGINAL_BNB names."""
    return {k: getattr(config, k) for k in ORIGINAL_BNB}


# ---------------------------------------------------------------------------------- item 9: HH numerics
@pytest.mark.parametrize("script", HH_SCRIPTS)
def test_hh_scripts_default_to_the_original_4bit_numerics(script, tmp_path, tiny_models, fake_4bit):
    """Each HH script's defaults give the original's BitsAndBytesConfig where ``from_pretrained`` gets it,
    and no prepare_model_for_kbit_training (the training scripts load a trainable model)."""
    from lolrl.tasks.hh.shared import precision

    args = parse_settings(HH_SCRIPTS[script], ["--output_dir", str(tmp_path / "out")])
    settings = precision(args)
    assert bnb_4bit_kwargs(settings["quantization"], "bf16") == ORIGINAL_BNB
    trainable = script not in ("qlora_llama_hh_eval.py", "ppo_hh_eval.py")
    if trainable:
        modeling.load_model(tiny_models["llama"], load_in_4bit=True, quantization=settings["quantization"])
    else:
        from lolrl.tasks.hh.evaluate import load_model_for_eval

        load_model_for_eval(tiny_models["llama"], None, args.quantization)
    (config,) = fake_4bit["configs"]
    assert bnb_fields(config) == ORIGINAL_BNB
    assert fake_4bit["prepared"] == 0


def test_hh_engine_configs_carry_the_script_settings(tmp_path, tiny_models):
    """The A-LoL/PRO engine config and PPO's config (parsed straight from the command line) hold the script's
    quantisation flags."""
    flags = ["--model_name_or_path", tiny_models["llama"], "--quant_type", "fp4", "--double_quant",
             "--compute_dtype", "bf16", "--prepare_kbit_training"]
    want = QuantizationSettings(quant_type="fp4", double_quant=True, compute_dtype="bf16", prepare_kbit_training=True)
    _, alol = hh.parse_hh((hh.ALoLHHData, hh.ALoLHHConfig), [*flags, "--output_dir", str(tmp_path / "a")], None)
    assert alol.quantization == want
    _, ppo = hh.parse_hh((hh.PPOHHData, hh.PPOHHConfig), [*flags, "--output_dir", str(tmp_path / "p")], None)
    assert ppo.quantization == want
    _, config = hh.parse_hh((hh.PROHHData, hh.PROHHConfig), ["--model_name_or_path", tiny_models["llama"],
                                                               "--output_dir", str(tmp_path / "r")], None)
    assert (config.algorithm, config.group_size, config.sampling_strategy) == ("pro", 2, "uniform")
    assert bnb_4bit_kwargs(config.quantization, config.dtype) == ORIGINAL_BNB
    assert not config.quantization.prepare_kbit_training


def test_generic_script_keeps_qlora_defaults(fake_4bit, tiny_models):
    """The generic script's --load_in_4bit is QLoRA's: NF4 with double quantisation, compute in the run's
    dtype (bf16 for fp32), prepare_model_for_kbit_training on."""
    from lolrl.tasks.paper.cli import parse_args

    _, config = parse_args(["-i", "d", "-tn", "reddit_pos", "-m", "m", "-o", "o", "--load_in_4bit"])
    quantization = config.quantization
    assert quantization == QuantizationSettings()
    modeling.load_model(tiny_models["causal"], dtype="fp16", load_in_4bit=True, quantization=quantization)
    assert bnb_fields(fake_4bit["configs"][0]) == {**ORIGINAL_BNB, "bnb_4bit_use_double_quant": True}
    assert fake_4bit["prepared"] == 1
    assert bnb_4bit_kwargs(quantization, "fp32")["bnb_4bit_compute_dtype"] == torch.bfloat16


@pytest.mark.parametrize("prepare", [True, False])
@pytest.mark.parametrize("trainable", [True, False])
def test_prepare_model_for_kbit_training_as_set(prepare, trainable, fake_4bit, tiny_models):
    settings = QuantizationSettings(prepare_kbit_training=prepare)
    modeling.load_model(tiny_models["causal"], load_in_4bit=True, quantization=settings, trainable=trainable)
    assert fake_4bit["prepared"] == int(prepare and trainable)
    fake_4bit["configs"].clear()
    modeling.load_model(tiny_models["causal"], load_in_4bit=False, quantization=settings, trainable=trainable)
    assert fake_4bit["configs"] == [] and fake_4bit["prepared"] == int(prepare and trainable)  # no 4-bit: nothing


def test_without_cuda_4bit_falls_back_and_prepares_nothing(monkeypatch, tiny_models, caplog):
    import peft

    monkeypatch.setattr(modeling, "can_load_in_4bit", lambda: False)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda *a, **k: pytest.fail("prepared"))
    with caplog.at_level("WARNING"):
        model = modeling.load_model(tiny_models["causal"], load_in_4bit=True)
    assert "4-bit quantisation is off" in caplog.text and not getattr(model, "is_loaded_in_4bit", False)


@pytest.mark.parametrize("script", ["lolrl_qlora_llama_hh.py", "qlora_llama_hh_eval.py",
                                    "train_generation_task_with_off_policy_PG.py"])
def test_quantisation_flags_parse(script):
    from lolrl.tasks.paper.cli import parse_args

    def parse(argv):
        if script in HH_SCRIPTS:
            return parse_settings(HH_SCRIPTS[script], argv)
        return Merged(*parse_args(["-i", "d", "-tn", "reddit_pos", "-m", "m", "-o", "o", *argv]))

    given = parse(["--quant_type", "fp4", "--double_quant", "True", "--bnb_4bit_compute_dtype", "bf16",
                   "--prepare_model_for_kbit_training", "False"])
    assert given.quantization == QuantizationSettings(quant_type="fp4", double_quant=True,
                                                                  compute_dtype="bf16", prepare_kbit_training=False)
    # the original's --no_ form
    assert parse(["--no_double_quant", "--compute_dtype", "auto"]).quantization.double_quant is False


@pytest.mark.parametrize("argv, message", [
    (["--quant_type", "int8"], "argument --quant_type: invalid choice: 'int8'"),
    (["--compute_dtype", "fp8"], "argument --compute_dtype/--bnb_4bit_compute_dtype: invalid choice: 'fp8'"),
])
def test_bad_quantisation_flags_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        hh.parse_hh((hh.ALoLHHData, hh.ALoLHHConfig), argv, None)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bad_quantisation_in_a_config_is_refused(tmp_path):
    from lolrl.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="--quant_type must be one of nf4, fp4"):
        OfflineRLConfig(model_name="m", output_dir=str(tmp_path), quantization=QuantizationSettings(quant_type="q"))


# ----------------------------------------------------------------------------- item 12: the cache key
def base_config(tmp_path, tiny_models, **changes) -> OfflineRLConfig:
    fields = {"model_name": tiny_models["causal"], "output_dir": str(tmp_path / "o"),
              "lora": LoraSettings(r=4), **changes}
    return OfflineRLConfig(**fields)


KEYED = {  # a setting that changes pi_ref's numbers -> the run's config changes (4-bit available)
    "dtype": {"bf16": True},
    "load_in_4bit": {"load_in_4bit": True},
    "quant_type": {"load_in_4bit": True, "quantization": QuantizationSettings(quant_type="fp4")},
    "double_quant": {"load_in_4bit": True, "quantization": QuantizationSettings(double_quant=False)},
    "compute_dtype": {"load_in_4bit": True, "quantization": QuantizationSettings(compute_dtype="fp16")},
    "prepare_kbit_training": {"load_in_4bit": True, "quantization": QuantizationSettings(prepare_kbit_training=False)},
    "max_prompt_length": {"max_prompt_length": 7},
    "full_fine_tune_in_bf16": {"bf16": True, "lora": LoraSettings(r=0)},  # the base then loads in fp32
}


@pytest.mark.parametrize("name", KEYED)
def test_every_numerics_setting_is_in_the_key(name, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setattr(modeling, "can_load_in_4bit", lambda: True)
    reference = {"load_in_4bit": True} if "quantization" in KEYED[name] else {}
    if name == "full_fine_tune_in_bf16":
        reference = {"bf16": True}
    before = numerics_key(base_config(tmp_path, tiny_models, **reference))
    after = numerics_key(base_config(tmp_path, tiny_models, **KEYED[name]))
    assert before != after, name


def test_model_adapter_tokenizer_lengths_kernel_and_packing_are_in_the_key(tmp_path, tiny_models):
    config = base_config(tmp_path, tiny_models)
    key = numerics_key(config, kernel="chunked", packing=False, max_resp_length=8)
    variants = [numerics_key(config, kernel="liger", packing=False, max_resp_length=8),
                numerics_key(config, kernel="chunked", packing="positions", max_resp_length=8),
                numerics_key(config, kernel="chunked", packing=False, max_resp_length=9),
                numerics_key(base_config(tmp_path, tiny_models, model_name=tiny_models["llama"]),
                             kernel="chunked", packing=False, max_resp_length=8),
                numerics_key(base_config(tmp_path, tiny_models, tokenizer_name=tiny_models["llama"]),
                             kernel="chunked", packing=False, max_resp_length=8)]
    assert all(v != key for v in variants)
    # a tokenizer folder is keyed by its files' contents, not its name
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    first = numerics_key(base_config(tmp_path, tiny_models, tokenizer_name=str(tok)))
    (tok / "tokenizer.json").write_text('{"edited": 1}')
    assert numerics_key(base_config(tmp_path, tiny_models, tokenizer_name=str(tok))) != first


def test_settings_that_leave_the_numbers_alone_are_not_in_the_key(tmp_path, tiny_models, monkeypatch):
    """Keyed on the numerics actually used: without CUDA, --load_in_4bit loads the same plain model
    (its quantisation settings are then moot); gradient checkpointing, dropout and a new LoRA
    adapter's own settings do not change pi_ref's outputs (test below)."""
    key = numerics_key(base_config(tmp_path, tiny_models))
    monkeypatch.setattr(modeling, "can_load_in_4bit", lambda: False)
    for changes in ({"load_in_4bit": True},
                    {"load_in_4bit": True, "quantization": QuantizationSettings(quant_type="fp4")},
                    {"gradient_checkpointing": True}, {"disable_dropout": False},
                    {"lora": LoraSettings(r=8, alpha=32, dropout=0.0)}):
        assert numerics_key(base_config(tmp_path, tiny_models, **changes)) == key, changes


def test_a_new_lora_adapter_leaves_the_log_probs_unchanged(tiny_models):
    """Why a new adapter's settings are not keyed: B = 0, so pi_ref's log-probs are the base's, bit for bit."""
    from lolrl.engine.collation import Collator, TokenizedRow

    base = modeling.load_model(tiny_models["llama"]).eval()
    adapted = modeling.add_lora(modeling.load_model(tiny_models["llama"]), LoraSettings(r=4, alpha=32)).eval()
    rows = [TokenizedRow(0, [5, 6, 7], [8, 9, 10, 11]), TokenizedRow(1, [12, 13], [14, 15])]
    batch = Collator(0, False)(rows)
    with torch.no_grad():
        plain, mask, _ = modeling.response_logprobs(base, batch)
        lora, _, _ = modeling.response_logprobs(adapted, batch)
    assert torch.equal(plain * mask, lora * mask)


@pytest.mark.slow
def test_a_4bit_run_recomputes_the_reference_pass(tmp_path, tiny_models, toy_dir, fake_4bit, monkeypatch, caplog):
    """End to end: a full-precision run's reference pass is reused by the same run without CUDA's 4-bit
    (the same numbers), never by a 4-bit run, nor by a 4-bit run with another quantisation."""
    from lolrl.tasks.paper.cli import main

    cache = tmp_path / "cache"

    def run(name, *extra, four_bit=False):
        monkeypatch.setattr(modeling, "can_load_in_4bit", lambda: four_bit)
        caplog.clear()
        argv = ["-i", str(toy_dir), "-tn", "toy", "--reward", "none", "-m", tiny_models["causal"],
                "-o", str(tmp_path / name), "-algo", "r_lol", "-t", "-e", "1", "--max_steps", "1",
                "-bs", "16", "-v_bs", "16", "-ml", "8", "--num_beams", "1", "-vf", "1", "--lora_r", "4",
                "--save_steps", "-1", "--no_test",
                "--cache_dir", str(cache), *extra]
        with caplog.at_level("INFO"):
            assert main(argv) == 0
        return json.loads((cache / "reference_pass.json").read_text())["key"], caplog.text

    plain, _ = run("plain")
    fallback, text = run("fallback", "--load_in_4bit")
    assert fallback == plain and "reusing cache" in text and "reference_pass.json" in text
    four_bit, text = run("four_bit", "--load_in_4bit", four_bit=True)
    assert four_bit != plain and "reference_pass.json was computed from other inputs" in text
    fp4, text = run("fp4", "--load_in_4bit", "--quant_type", "fp4", four_bit=True)
    assert fp4 not in (plain, four_bit) and "reference_pass.json was computed from other inputs" in text
    assert [c.bnb_4bit_quant_type for c in fake_4bit["configs"]] == ["nf4", "fp4"]


def test_ppo_initial_validation_key_misses_on_a_quantisation_change(tmp_path, tiny_models, monkeypatch):
    """PPO's cached starting-policy generations are keyed by the same function."""
    from types import SimpleNamespace

    from lolrl.online import ppo

    monkeypatch.setattr(modeling, "can_load_in_4bit", lambda: True)
    keys = []

    class Cache:
        def load(self, name, key, check):
            keys.append(key)
            return {"completions": [], "rewards": {}}, {}

    config = ppo.PPOConfig(model_name=tiny_models["llama"], output_dir=str(tmp_path / "p"), lora=LoraSettings(r=4),
                           load_in_4bit=True)
    reward = SimpleNamespace(cache_key=lambda: "r")
    for settings in (config, dataclasses.replace(config, quantization=QuantizationSettings(double_quant=False)),
                     dataclasses.replace(config, load_in_4bit=False)):
        ppo.PPOTrainer._initial_generations(SimpleNamespace(config=settings, val_records=[], reward=reward,
                                                            cache=Cache()))
    assert len(set(keys)) == 3
