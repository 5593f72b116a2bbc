"""HH data in PRO's format: reading, rendering, post-processing, cleaning (real dev file when present)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hh_tiny import TURNS, pro_row, sentencepiece_tokenizer, tiny_reward_model
from ports import free_port

from lolrl.engine.data import DataError
from lolrl.tasks.hh.data import (
    SYSTEM_PREFIX,
    clean_training_rows,
    postprocess,
    pro_records,
    read_pro_file,
    render_anthropic,
    render_llama,
    to_chat,
)

pytestmark = pytest.mark.slow  # the fast lane: pytest -m "not slow"

ROOT = Path(__file__).parents[3]
DEV = ROOT.parent / "shared" / "data" / "hh" / "hh_dev" / "sampled_dev.json"


def test_renderings():
    assert render_llama(TURNS) == SYSTEM_PREFIX + "### Human: Q1 ### Assistant: A1 ### Human: Q2 ### Assistant:"
    assert render_anthropic(TURNS) == "Human: Q1\nAssistant: A1\nHuman: Q2\nAssistant:"
    assert to_chat(TURNS) == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                              {"role": "user", "content": "Q2"}]


@pytest.mark.parametrize("text, expected", [
    ("Sure, here it is.\n### Human: and now?", "Sure, here it is."),
    ("Fine.\nHuman: next", "Fine."),
    ("Okay ###", "Okay"),
    ("  plain  ", "plain"),
    # a generation not stopped at '###' (SentencePiece: ' ###' was two tokens) continues the dialogue so
    ("Sure. ### Human: and more? ### Assistant: invented", "Sure."),
    ("### Human: an invented turn", ""),
])
def test_postprocess(text, expected):
    assert postprocess(text) == expected


def test_stop_marker_under_sentencepiece_and_todays_tokenizers(tmp_path, tiny_models):
    """The '###' that starts the next turn is one token in LLaMA's vocabulary ('▁###', 835), but
    encode(" ###") is two under SentencePiece's rules: the marker is found as the last id of
    encode("a ###"), for every tokenizer style, and the training, PPO and evaluation paths share it."""
    from lolrl.engine.modeling import load_tokenizer
    from lolrl.tasks.hh import evaluate
    from lolrl.tasks.hh import shared as train
    from lolrl.tasks.hh.data import stop_ids

    legacy = sentencepiece_tokenizer(tmp_path / "sp", legacy=True)
    marker = legacy.convert_tokens_to_ids("▁###")
    assert legacy.tokenize(" ###") == ["▁", "▁###"]  # the premise: two tokens under SentencePiece rules
    assert stop_ids(legacy) == [marker]
    assert stop_ids(load_tokenizer(str(tmp_path / "sp"))) == [marker]  # saved and loaded back: same rules
    assert train.generation_settings(str(tmp_path / "sp")).stop_token_ids == [marker]  # offline trainers, PPO, DPO
    assert evaluate.stop_ids is stop_ids  # the test evaluation's default stop
    today = sentencepiece_tokenizer(legacy=False)  # Metaspace: ' ###' is one token
    assert today.tokenize(" ###") == ["▁###"] and stop_ids(today) == [today.convert_tokens_to_ids("▁###")]
    from lolrl.demo.tiny import train_tokenizer

    byte_level = train_tokenizer(["Sure. ### Human: a ### Assistant: b"] * 20, tmp_path / "bl", vocab_size=300)
    assert stop_ids(byte_level) == [byte_level.convert_tokens_to_ids("Ġ###")]
    tiny = load_tokenizer(tiny_models["llama"])  # no single token for ' ###': no stop id, the clean-up cuts
    assert len(tiny.tokenize(" ###")) > 1 and stop_ids(tiny) == []


def test_records_and_sigmoid_rewards(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps(pro_row()) + "\n")
    rows = read_pro_file(path)
    sft = pro_records(rows)
    assert len(sft) == 1 and sft[0].response == "good answer" and sft[0].reward == pytest.approx(1 / (1 + math.e ** -1))
    both = pro_records(rows, candidates="all", how="chat")
    assert [r.reward for r in both] == pytest.approx([1 / (1 + math.e ** -1), 1 / (1 + math.e)])
    assert both[0].is_chat


def test_record_errors_after_reading_name_the_file_and_line(tmp_path, tiny_models):
    """PRO with a one-suffix training record, through the script: the file and line, not 'train:1'."""
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cleaner_train.json").write_text(json.dumps(pro_row(("only one",), (1.0,))) + "\n")
    (tmp_path / "dev.json").write_text(json.dumps(pro_row()) + "\n")
    proc = subprocess.run([sys.executable, str(ROOT / "pro_qlora_llama_hh.py"), "--model_name_or_path",
                           tiny_models["llama"], "--adapter_path", "none", "--train_file_path", str(tmp_path / "train"),
                           "--eval_file_path", str(tmp_path / "dev.json"), "--output_dir", str(tmp_path / "out"),
                           "--reward", "none"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cleaner_train.json:1: field 'suffix': need 2 candidates" in errors[0], errors
    # DPO's pairs and the test evaluation's bad-index file name theirs too
    from lolrl.tasks.hh.dpo import preference_pairs
    from lolrl.tasks.hh.evaluate import bad_indices

    rows = read_pro_file(tmp_path / "train" / "cleaner_train.json")
    with pytest.raises(DataError, match=r"cleaner_train.json:1: field 'suffix': a preference pair needs 2 suffixes"):
        preference_pairs(rows)
    (tmp_path / "bad_test_indices.json").write_text('{"harmless_base.json": [1,\n 2,, 3]}')
    with pytest.raises(DataError, match=r"bad_test_indices.json:2: invalid JSON"):
        bad_indices(tmp_path)


def test_bad_pro_rows_name_the_field(tmp_path):
    path = tmp_path / "f.json"
    broken = pro_row()
    broken["reward"] = [1.0]
    path.write_text(json.dumps(pro_row()) + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(DataError, match=r"f.json:2: field 'reward': 1 rewards for 2 suffixes"):
        read_pro_file(path)


def test_cleaning_rule_and_script(tmp_path):
    rows = [pro_row(("fine", "also fine")), pro_row(("here are some options:", "x")), pro_row(("ok", "cut off:")),
            pro_row(("ends with colon and space: ", "y"))]
    kept, report = clean_training_rows(rows)
    assert [r["suffix"][0] for r in kept] == ["fine", "ends with colon and space: "]  # literal test, no strip
    assert report == {"records": 4, "good_suffix_ends_with_colon": 1, "bad_suffix_ends_with_colon": 1,
                      "dropped": 2, "kept": 2}
    src, dst = tmp_path / "train.json", tmp_path / "cleaner_train.json"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, str(ROOT / "data_cleaning.py"), "--input", str(src), "--output", str(dst)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "dropped 2, kept 2" in proc.stdout
    assert len(dst.read_text().splitlines()) == 2


@pytest.mark.skipif(not DEV.is_file(), reason="the real HH dev file (../shared/data/hh) is not present")
def test_real_dev_file():
    with pytest.raises(DataError, match="sampled_dev.json:\\d+: field 'suffix\\[\\d\\]': is empty"):
        read_pro_file(DEV)  # one real record has an empty response: refused where it would be trained on
    rows = read_pro_file(DEV, allow_empty_suffix=True)
    assert len(rows) == 280
    records = pro_records(rows)
    assert all(r.prompt.startswith(SYSTEM_PREFIX + "### Human:") and r.prompt.endswith("### Assistant:")
               for r in records)
    assert all(0.0 < r.reward < 1.0 for r in records)


def test_openassistant_reward_model_architecture_loads_and_scores(tmp_path):
    """A tiny checkpoint of the custom `gpt_neox_reward_model` type loads through the Auto classes and
    scores the marker-format dialogue at its last real token, whatever the padding."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lolrl.demo.tiny import train_tokenizer
    from lolrl.tasks.hh.reward_model import (
        GPTNeoXRewardModel,
        GPTNeoXRewardModelConfig,
        HHRewardModel,
        register,
        reward_model_text,
    )

    corpus = ["<|prompter|>Q1", "<|assistant|>A1", "a fine answer", "no", "<eos>"] * 5
    tokenizer = train_tokenizer(corpus, tmp_path / "rm", vocab_size=300, with_pad=True)
    torch.manual_seed(0)
    config = GPTNeoXRewardModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    GPTNeoXRewardModel(config).save_pretrained(tmp_path / "rm")
    register()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert isinstance(loaded, GPTNeoXRewardModel)
    text = reward_model_text(TURNS, "a fine answer", "<eos>")
    assert text == "<|prompter|>Q1<eos><|assistant|>A1<eos><|prompter|>Q2<eos><|assistant|>a fine answer<eos>"
    reward = HHRewardModel(str(tmp_path / "rm"), device="cpu", batch_size=2)
    alone = reward(["p"], ["a fine answer"], turns=[TURNS])
    batched = reward(["p", "p"], ["a fine answer", "no " * 20], turns=[TURNS, TURNS])
    assert 0.0 < alone[0] < 1.0 and batched[0] == pytest.approx(alone[0], abs=1e-5)
    ids = reward.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        direct = torch.sigmoid(loaded(**ids).logits[0, 0]).item()
    assert alone[0] == pytest.approx(direct, abs=1e-5)



@pytest.mark.parametrize("script, flag, location", [
    ("lolrl_qlora_llama_hh.py", "--reward_model", "{tmp}/missing/rm"),  # refused when parsed
    ("ppo_qlora_llama_hh.py", "--reward_model", "./missing_rm"),
    ("qlora_llama_hh_eval.py", "--reward_model", "missing_rm"),  # a hub id, not cached: refused when loaded
    ("dpo_qlora_llama_hh.py", "--adapter_path", "{tmp}/missing/adapter"),
    ("pro_qlora_llama_hh.py", "--model_name_or_path", "{tmp}/missing/model"),
])
def test_missing_model_locations_are_one_line_errors(tmp_path, tiny_models, script, flag, location):
    location = location.format(tmp=tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "cleaner_train.json").write_text(json.dumps(pro_row()) + "\n")
    (tmp_path / "dev.json").write_text(json.dumps(pro_row()) + "\n")
    argv = {"--model_name_or_path": tiny_models["llama"], "--adapter_path": "none", "--reward_model": None,
            flag: location}
    common = [a for k, v in argv.items() if v is not None for a in (k, v)]
    extra = (["--test_dir", str(tmp_path)] if "eval" in script else
             ["--train_file_path", str(tmp_path / "train"), "--eval_file_path", str(tmp_path / "dev.json")])
    proc = subprocess.run([sys.executable, str(ROOT / script), *common, *extra, "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    named, value = errors[0].split(" ")[1:3] if errors else ("", "")  # the flag with its aliases: --a/--b
    assert len(errors) == 1 and flag in named.split("/") and value.startswith(repr(location)), proc.stderr[-2000:]


def test_hh_eval_script_with_adapter_and_bad_indices(tmp_path, tiny_models):
    """qlora_llama_hh_eval.py on a tiny base + LoRA adapter and a tiny reward model, two test splits."""
    from peft import LoraConfig, get_peft_model

    from lolrl.engine.modeling import load_model

    adapter = tmp_path / "adapter"
    get_peft_model(load_model(tiny_models["llama"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])) \
        .save_pretrained(adapter)
    tiny_reward_model(tmp_path / "rm")
    test_dir = tmp_path / "hh_test"
    test_dir.mkdir()
    for split, n in (("harmless_base", 5), ("helpful_base", 3)):
        (test_dir / f"{split}.json").write_text("".join(json.dumps(pro_row()) + "\n" for _ in range(n)))
    (test_dir / "bad_test_indices.json").write_text(json.dumps({"harmless_base.json": [0, 2], "helpful_base.json": []}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "qlora_llama_hh_eval.py"), "--model_name_or_path",
                           tiny_models["llama"], "--adapter_path", str(adapter), "--reward_model", str(tmp_path / "rm"),
                           "--test_dir", str(test_dir), "--output_dir", str(out), "--exclude_bad_indices",
                           "--per_device_eval_batch_size", "4"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "hh_eval_results.json").read_text())
    assert results["harmless_base"]["n"] == 3 and results["helpful_base"]["n"] == 3  # 2 bad indices skipped
    lines = [json.loads(l) for l in (out / "harmless_base_eval_results.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and set(lines[0]) == {"prefix", "suffix", "reward"}
    assert all(0.0 < l["reward"] < 1.0 for l in lines) and lines[0]["prefix"].startswith(SYSTEM_PREFIX)
    assert (out / "hh_eval_results.md").exists() and (out / "hh_reward_distribution.png").exists()


@pytest.mark.parametrize("algorithm, strategy", [
    ("nll", "uniform"), ("wbc", "good_random"), ("r_gold", "None"), ("r_lol", "good_priority"),
    ("a_lol", "good_priority"), ("a_lol_ref_free", "good_random"), ("a_lol_seq", "all_priority"),
    ("a_lol_kl", "good_priority")])
def test_hh_training_script_on_tiny_models(tmp_path, tiny_models, algorithm, strategy):
    from lolrl.tasks.hh.offline import alol_main as hh_main

    args = _hh_training_fixture(tmp_path, tiny_models)
    code = hh_main(args + ["--algorithm", algorithm, "--sampling_strategy", strategy, "--max_steps", "4",
                           "--eval_steps", "2", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1"])
    assert code == 0
    out = tmp_path / "out"
    assert (out / "best_adapter" / "adapter_model.safetensors").exists()
    plan = json.loads((out / "training_plan.json").read_text())
    if not algorithm.startswith("a_lol"):
        assert plan["optimizer_steps"] == 4 and plan["rows"] == 16
    else:  # steps rescaled by the positive share; all_priority trains on both suffixes of every record
        stats = json.loads((out / "advantage_stats.json").read_text())
        positive = round((1 - stats["share_non_positive"]) * stats["n"])
        assert plan["rows"] == (32 if strategy == "all_priority" else 16)
        assert plan["optimizer_steps"] == max(1, int(4 * positive / 16))
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert validations and all(0.0 < v["final_reward"] < 1.0 and 0.0 <= v["meteor"] <= 1.0 for v in validations)
    if algorithm == "a_lol_kl":  # no --kl_beta: the engine's default, not 0
        assert json.loads((out / "args.json").read_text())["kl_beta"] == 0.1


@pytest.mark.parametrize("flags, algorithm, beta", [
    ([], "a_lol_kl", 0.1),  # --kl_beta not given: the engine's default for a_lol_kl (before: 0, no KL term)
    (["--kl_beta", "0.3"], "a_lol_kl", 0.3),
    (["--kl_beta", "0"], "a_lol_kl", 0.0),  # runs, with a warning saying what it equals
])
def test_hh_a_lol_kl_beta(tmp_path, tiny_models, caplog, flags, algorithm, beta):
    import logging

    from lolrl.tasks.hh.cli import ALoLHHConfig, ALoLHHData, parse_hh
    from lolrl.tasks.hh.offline import alol_data as build

    rows = [pro_row()] * 2
    with caplog.at_level(logging.INFO):
        data_args, config = parse_hh((ALoLHHData, ALoLHHConfig), ["--model_name_or_path", tiny_models["llama"],
                                     "--output_dir", str(tmp_path / "out"), "--algorithm", "a_lol_kl", *flags], None)
        build(data_args, config, rows, rows)
    assert (config.algorithm, config.kl_beta) == (algorithm, beta)
    assert f"a_lol_kl: KL beta {beta:g}" in caplog.text
    assert ("engine's default" in caplog.text) == (not flags)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "kl_beta" in r.getMessage()]
    assert bool(warned) == (beta == 0) and all("a_lol_ref_free" in w for w in warned)


@pytest.mark.parametrize("flags, algorithm, beta", [
    (["--algorithm", "a_lol", "--ppo_clip", "0", "--kl_beta", "0.2"], "a_lol_kl", 0.2),  # the original's spelling
    (["--algorithm", "a_lol", "--ppo_clip", "0"], "a_lol", None),  # the original's default --kl_beta 0.0
    (["--algorithm", "a_lol", "--kl_beta", "0"], "a_lol", None),
    (["--algorithm", "nll", "--kl_beta", "0.0"], "nll", None),
])
def test_hh_kl_spellings_of_the_original(tmp_path, tiny_models, flags, algorithm, beta):
    from lolrl.tasks.hh.cli import ALoLHHConfig, ALoLHHData, parse_hh
    from lolrl.tasks.hh.offline import alol_data as build

    rows = [pro_row()] * 2
    data_args, config = parse_hh((ALoLHHData, ALoLHHConfig), ["--model_name_or_path", tiny_models["llama"],
                                 "--output_dir", str(tmp_path / "out"), *flags], None)
    build(data_args, config, rows, rows)
    assert (config.algorithm, config.kl_beta) == (algorithm, beta)


def test_hh_a_lol_kl_refuses_a_clip(tmp_path, tiny_models, capsys):

    from lolrl.tasks.hh.cli import ALoLHHConfig, ALoLHHData, parse_hh

    for flags in (["--algorithm", "a_lol_kl", "--ppo_clip", "0.5"], ["--algorithm", "a_lol", "--kl_beta", "0.1"]):
        with pytest.raises(SystemExit) as stop:  # refused while the command line is parsed, in one line
            parse_hh((ALoLHHData, ALoLHHConfig), ["--model_name_or_path", tiny_models["llama"], "--output_dir",
                                                  str(tmp_path / "out"), *flags], None)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and "clip" in err and len(err.splitlines()) == 1, err


def _hh_training_fixture(tmp_path, tiny_models, n_train=16):
    """Tiny PRO-format train/dev files, a LoRA adapter on the tiny Llama and a tiny OpenAssistant-style RM."""
    import random

    import torch
    from peft import LoraConfig, get_peft_model

    from lolrl.engine.modeling import load_model

    rng = random.Random(0)
    (tmp_path / "train").mkdir()
    rows = [pro_row(("a kind and helpful answer", "go away"), (rng.uniform(-3, 3), rng.uniform(-3, 3)))
            for _ in range(n_train)]
    (tmp_path / "train" / "cleaner_train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.json").write_text("".join(json.dumps(pro_row()) + "\n" for _ in range(6)))
    adapter = tmp_path / "adapter"
    model = get_peft_model(load_model(tiny_models["llama"]), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a starting adapter that differs from the base model, like a real SFT adapter
            param.data.normal_(0, 0.5)
    model.save_pretrained(adapter)
    tiny_reward_model(tmp_path / "rm")
    return ["--model_name_or_path", tiny_models["llama"], "--adapter_path", str(adapter),
            "--train_file_path", str(tmp_path / "train"), "--eval_file_path", str(tmp_path / "dev.json"),
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"),
            "--reward_model", str(tmp_path / "rm"), "--per_device_eval_batch_size", "4"]


def test_pro_script_trains_on_candidate_groups(tmp_path, tiny_models):
    from lolrl.tasks.hh.offline import pro_main

    args = _hh_training_fixture(tmp_path, tiny_models, n_train=8)
    code = pro_main(args + ["--max_steps", "3", "--eval_steps", "3", "--per_device_train_batch_size", "2",
                            "--gradient_accumulation_steps", "1"])
    assert code == 0
    out = tmp_path / "out"
    plan = json.loads((out / "training_plan.json").read_text())
    assert plan["rows"] == 16 and plan["rows_per_epoch"] == 8  # 8 prompts x 2 candidates, sampled per prompt
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 and {"ranking_loss", "sft_nll"} <= set(log[-1])
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [0, 3]  # the starting adapter is validated first, as the original
    assert (out / "best_adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("reference_free", [False, True])
def test_dpo_script_with_trl(tmp_path, tiny_models, reference_free):
    sys.path.insert(0, str(ROOT))
    from dpo_qlora_llama_hh import main as dpo_main

    args = _hh_training_fixture(tmp_path, tiny_models, n_train=8)
    code = dpo_main(args + ["--max_steps", "2", "--eval_steps", "2", "--per_device_train_batch_size", "2",
                            "--gradient_accumulation_steps", "1", "--logging_steps", "1"]
                    + (["--reference_free"] if reference_free else []))
    assert code == 0
    out = tmp_path / "out"
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validations] == [0, 2] and all(0 < v["final_reward"] < 1 for v in validations)
    assert all(0 <= v["meteor"] <= 1 for v in validations)  # RewardValidationCallback: against the chosen responses
    best = out / "best_adapter"
    assert (best / "adapter_model.safetensors").exists() and not (best / "ref").exists()  # the policy adapter only
    last = sorted((out / "checkpoints").glob("checkpoint-*"))[-1]
    state = json.loads(last.joinpath("trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert logged and all(math.isfinite(e["loss"]) for e in logged)
    if not reference_free:  # at step 1 the policy is the reference: the implicit reward margin starts at 0
        assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)


def test_preference_report_on_hand_numbers():
    from lolrl.tasks.hh.preference import preference_report

    report = preference_report([-10.0, -5.0, -7.0], [-12.0, -4.0, -7.0], [-11.0, -6.0, -6.0], [-11.0, -6.0, -8.0],
                               chosen_tokens=[5, 5, 7], rejected_tokens=[4, 2, 7])
    assert report["likelihood_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)  # margins 2, -1, 0 (a tie)
    assert report["likelihood_margin"] == pytest.approx((2 - 1 + 0) / 3)
    # per token: -2 - (-3) = 1; -1 - (-2) = 1; -1 - (-1) = 0
    assert report["likelihood_accuracy_per_token"] == pytest.approx((1 + 1 + 0.5) / 3)
    # implicit: margin - ref margin = 2 - 0, -1 - 0, 0 - 2
    assert report["implicit_accuracy"] == pytest.approx(1 / 3)
    assert report["implicit_margin"] == pytest.approx((2 - 1 - 2) / 3)


def test_pair_records_put_the_higher_reward_first():
    from lolrl.tasks.hh.preference import pair_records

    chosen, rejected = pair_records([pro_row(("x", "y"), (0.1, 0.9)), pro_row(("p", "q"), (2.0, 1.0)),
                                     pro_row(("t", "t"), (1, 1))])
    assert [r.response for r in chosen] == ["y", "p"] and [r.response for r in rejected] == ["x", "q"]


def test_hh_a_lol_without_a_reward_model_fits_value_on_stored_rewards(tmp_path, tiny_models):
    """--reward none --value_source data: V(x) from the dev file's stored rewards, validation by NLL."""
    from lolrl.tasks.hh.offline import alol_main as hh_main

    args = _hh_training_fixture(tmp_path, tiny_models)
    code = hh_main(args + ["--algorithm", "a_lol", "--sampling_strategy", "all_priority", "--reward", "none",
                           "--value_source", "data", "--max_steps", "2", "--eval_steps", "2",
                           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"])
    assert code == 0
    out = tmp_path / "out"
    fit = json.loads((out / "value_fit.json").read_text())
    assert fit["n_fit"] == 6  # 6 dev prompts, each with the mean stored reward of its suffixes, all in the final head
    assert not (out / "reward_check.json").exists()  # nothing was generated or scored
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert validations and all("neg_nll_per_token" in v for v in validations)


def test_hh_value_source_data_generates_and_scores_each_dev_prompt_once(tmp_path, tiny_models):
    """--value_source data with a validation reward: every validation (step 0, later ones, the final
    evaluation) generates and scores each dev prompt once (before: once per suffix), and V(x) is fit
    per prompt on the mean stored reward of its suffixes."""
    from lolrl.tasks.hh.cli import ALoLHHConfig, ALoLHHData, parse_hh
    from lolrl.tasks.hh.data import sigmoid
    from lolrl.tasks.hh.offline import alol_main as hh_main
    from lolrl.tasks.hh.shared import validation_records

    args = _hh_training_fixture(tmp_path, tiny_models)
    dev = [pro_row((f"answer {i}", f"other {i}"), (0.3 * i - 1, 1 - 0.2 * i)) for i in range(6)]
    for i, row in enumerate(dev):
        row["prefix"] = [[f"<|prompter|>question {i}", "<|assistant|>"]] * 2
    (tmp_path / "dev6.json").write_text("".join(json.dumps(r) + "\n" for r in dev))
    calls = tmp_path / "reward_calls.jsonl"
    (tmp_path / "count_reward.py").write_text(
        "import json\n"
        "def score(prompts, completions, **columns):\n"
        f"    with open({str(calls)!r}, 'a') as handle:\n"
        "        handle.write(json.dumps(prompts) + '\\n')\n"
        "    return [0.5 + 0.01 * (len(c) % 7) for c in completions]\n")
    flags = ["--eval_file_path", str(tmp_path / "dev6.json"), "--reward", f"{tmp_path / 'count_reward.py'}:score",
             "--algorithm", "a_lol", "--value_source", "data", "--max_steps", "2", "--eval_steps", "1",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    assert hh_main(args + flags) == 0
    from collections import Counter

    scored = Counter(p for line in calls.read_text().splitlines() for p in json.loads(line))
    validations = (tmp_path / "out" / "validation_stats.jsonl").read_text().splitlines()
    stages = len(validations) + 1  # every validation (step 0's reuses pi_ref's generations) and the final one
    assert len(validations) >= 2 and len(scored) == 6 and set(scored.values()) == {stages}, (stages, scored)
    fit = json.loads((tmp_path / "out" / "value_fit.json").read_text())
    assert fit["n_fit"] == 6
    records = validation_records(parse_hh((ALoLHHData, ALoLHHConfig), [], None)[0], dev, "mean")
    assert [r.response for r in records] == [f"answer {i}" for i in range(6)]  # the gold: the sft_index suffix
    assert [r.reward for r in records] == pytest.approx([(sigmoid(a) + sigmoid(b)) / 2 for a, b in
                                                         (row["reward"] for row in dev)])


def test_response_logprob_sums_match_a_direct_forward(tiny_models):
    import torch

    from lolrl.engine.data import Record
    from lolrl.engine.modeling import load_model, load_tokenizer
    from lolrl.tasks.hh.preference import response_logprob_sums

    tokenizer = load_tokenizer(tiny_models["llama"])
    model = load_model(tiny_models["llama"]).eval()
    records = [Record(id="a", prompt="hello there", response="a kind answer"),
               Record(id="b", prompt="a longer prompt with more words", response="no")]
    sums, lengths = response_logprob_sums(model, tokenizer, records, batch_size=2)
    for record, total, n in zip(records, sums, lengths):
        prompt = tokenizer(record.prompt)["input_ids"]
        response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logprobs = model(ids).logits.log_softmax(-1)[0, len(prompt) - 1:-1]
        expected = logprobs.gather(-1, torch.tensor(response)[:, None]).sum().item()
        assert n == len(response) and total == pytest.approx(expected, abs=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("script, extra", [
    ("lolrl_qlora_llama_hh.py", ["--algorithm", "a_lol", "--sampling_strategy", "all_priority"]),
    ("pro_qlora_llama_hh.py", []),
])
def test_hh_scripts_with_two_processes(tmp_path, tiny_models, script, extra):
    """torchrun, two gloo processes: the per-process batches of prompts (PRO: of candidate groups)."""
    args = _hh_training_fixture(tmp_path, tiny_models, n_train=8)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / script), *args, *extra, "--max_steps", "2", "--eval_steps", "2",
           "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert json.loads((out / "training_plan.json").read_text())["global_batch"] == 4  # 2 processes x 2 items
    validations = [json.loads(l) for l in (out / "validation_stats.jsonl").read_text().splitlines()]
    assert validations[0]["step"] == 0 and len(validations) >= 2  # written once, by the main process
    assert (out / "best_adapter" / "adapter_model.safetensors").exists()
