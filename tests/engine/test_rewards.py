"""Tests for lolrl.engine.rewards: spec parsing, weighted sums, classifiers and error messages."""
from __future__ import annotations

import json
import math
import os
import uuid

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
)

from lolrl.engine.rewards import (
    RewardComponent,
    RewardFunction,
    RewardOutputError,
    RewardSpecError,
    load_reward,
)

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park today",
    "what is two plus two",
    "four is the answer",
    "user assistant system hello there",
]
PROMPTS = ["what is two plus two", "hello there", "the cat sat"]
COMPLETIONS = ["four", "a dog ran in the park today on the mat", "on the mat the cat sat"]

REWARD_MODULE = '''
def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]

def bonus(prompts, completions, bonus, **kw):
    return [float(b) for b in bonus]

def prompt_kind(prompts, completions, **kw):
    return [1.0 if isinstance(p, list) else 0.0 for p in prompts]

def wrong_length(prompts, completions, **kw):
    return [1.0] * (len(completions) + 1)

def with_nan(prompts, completions, **kw):
    return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]

def with_string(prompts, completions, **kw):
    return ["high" for _ in completions]

def with_none(prompts, completions, **kw):
    return [None if i == 1 else 0.0 for i in range(len(completions))]

NOT_CALLABLE = 3
'''


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A uniquely named importable module of reward functions (no sys.modules clashes)."""
    name = f"rewmod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _word_tokenizer(special: list[str], **special_kwargs) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=special))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]",
        model_input_names=["input_ids", "attention_mask"], **special_kwargs,
    )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = _word_tokenizer(["[PAD]", "[UNK]"], pad_token="[PAD]")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """Decoder classifier whose tokenizer has an eos token but no pad token."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = _word_tokenizer(["<|endoftext|>", "[UNK]"], eos_token="<|endoftext|>")
    assert tokenizer.pad_token is None
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64, num_labels=2,
        pad_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    GPT2ForSequenceClassification(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _direct_logits(model_dir, texts, model_cls) -> torch.Tensor:
    """Reference: each text alone (no padding) through the saved model."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    model = model_cls.from_pretrained(model_dir).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            rows.append(model(**enc).logits[0])
    return torch.stack(rows)


# --------------------------------------------------------------------------- callables


def test_module_callable_forwards_columns(reward_module):
    reward = load_reward(f"{reward_module}:bonus")
    out = reward(PROMPTS, COMPLETIONS, bonus=[1, 2.5, -3], show_progress=False)
    assert reward.component_names == ["bonus"]
    assert out["bonus"] == [1.0, 2.5, -3.0]
    assert out["final_reward"] == [1.0, 2.5, -3.0]


def test_file_callable_and_chat_prompts_pass_through(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_MODULE)
    reward = load_reward(f"kind={path}:prompt_kind + {path}:length")
    prompts = [[{"role": "user", "content": "hi"}], "plain"]
    out = reward(prompts, ["abc", "de"], show_progress=False)
    assert out["kind"] == [1.0, 0.0]
    assert out["length"] == [3.0, 2.0]
    assert out["final_reward"] == [4.0, 2.0]


def test_weighted_sum_is_exact(reward_module):
    reward = load_reward(f"0.5*a={reward_module}:length +  b = {reward_module}:bonus")
    bonus = [0.1, 0.7, 1.3]
    out = reward(PROMPTS, COMPLETIONS, bonus=bonus, batch_size=2, show_progress=False)
    lengths = [float(len(c)) for c in COMPLETIONS]
    assert out["a"] == lengths and out["b"] == bonus
    assert out["final_reward"] == [0.5 * a + b for a, b in zip(lengths, bonus)]
    assert reward.to_spec() == {"components": [
        {"name": "a", "weight": 0.5, "source": f"{reward_module}:length"},
        {"name": "b", "weight": 1.0, "source": f"{reward_module}:bonus"},
    ]}


def test_exponent_weight_and_negative_weight(reward_module):
    reward = load_reward(f"1e+1*x={reward_module}:length + -2*y={reward_module}:length")
    out = reward(["p"], ["abcd"], show_progress=False)
    assert [c.weight for c in reward.components] == [10.0, -2.0]
    assert out["final_reward"] == [40.0 - 8.0]


def test_from_callables_and_batches():
    calls = []

    def count(prompts, completions, **kw):
        calls.append(len(prompts))
        return [float(i) for i, _ in enumerate(completions)]

    reward = RewardFunction.from_callables({"c": count, "d": lambda prompts, completions, **kw: [2] * len(prompts)},
                                           weights={"d": 3.0})
    out = reward(["p"] * 5, ["c"] * 5, batch_size=2, show_progress=False)
    assert calls == [2, 2, 1]
    assert out["c"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert out["final_reward"] == [6.0, 7.0, 6.0, 7.0, 6.0]
    assert RewardFunction.from_callables(count).component_names == ["count"]


def test_progress_bar_uses_desc(capsys):
    reward = RewardFunction.from_callables(lambda prompts, completions, **kw: [1.0] * len(prompts))
    reward(["p"] * 3, ["c"] * 3, batch_size=2, desc="scoring-xyz")
    assert "scoring-xyz" in capsys.readouterr().err
    reward(["p"] * 3, ["c"] * 3, desc="quiet-xyz", show_progress=False)
    assert "quiet-xyz" not in capsys.readouterr().err


def test_from_callables_rejects_unknown_weights():
    def count(prompts, completions, **kw):
        return [0.0] * len(prompts)

    with pytest.raises(RewardSpecError, match="unknown components"):
        RewardFunction.from_callables(count, weights={"nope": 1.0})


def test_json_spec(tmp_path, reward_module):
    (tmp_path / "local.py").write_text(REWARD_MODULE)
    spec = {"components": [
        {"name": "len", "weight": 2.0, "source": f"{reward_module}:length"},
        {"source": "local.py:bonus"},  # resolved next to the JSON file
    ]}
    path = tmp_path / "reward.json"
    path.write_text(json.dumps(spec))
    reward = load_reward(str(path))
    assert reward.component_names == ["len", "bonus"]
    out = reward(["p", "q"], ["ab", "c"], bonus=[1.0, 0.5], show_progress=False)
    assert out["final_reward"] == [5.0, 2.5]
    assert reward.to_spec()["components"][0] == spec["components"][0]


# --------------------------------------------------------------------------- classifiers


def test_classifier_transforms_match_direct_computation(bert_dir):
    logits = _direct_logits(bert_dir, COMPLETIONS, BertForSequenceClassification)
    probs = torch.softmax(logits, dim=-1)[:, 1].tolist()

    def score(options):
        reward = load_reward(f"hf:{bert_dir}{options}")
        return reward(PROMPTS, COMPLETIONS, show_progress=False)[reward.component_names[0]]

    assert score("#softmax[1]") == pytest.approx(probs, abs=1e-5)
    assert score("") == pytest.approx(probs, abs=1e-5)  # default for 2 labels
    assert score("#1-softmax[1]") == pytest.approx([1 - p for p in probs], abs=1e-5)
    assert score("#logit[0]") == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
    assert score("#sigmoid[1]") == pytest.approx(torch.sigmoid(logits[:, 1]).tolist(), abs=1e-5)
    assert len(set(round(p, 6) for p in probs)) == 3  # the rows really differ


def test_classifier_name_and_input_modes(bert_dir):
    reward = load_reward(f"0.5*hf:{bert_dir}#logit[1],input=prompt_completion,max_length=32")
    assert reward.component_names == [bert_dir.name] and bert_dir.name.startswith("tiny-bert")
    joined = [f"{p} {c}" for p, c in zip(PROMPTS, COMPLETIONS)]
    expected = _direct_logits(bert_dir, joined, BertForSequenceClassification)[:, 1].tolist()
    out = reward(PROMPTS, COMPLETIONS, show_progress=False)
    assert out[reward.component_names[0]] == pytest.approx(expected, abs=1e-5)
    assert out["final_reward"] == pytest.approx([0.5 * e for e in expected], abs=1e-5)

    chat = [[{"role": "user", "content": "hello there"}]]
    pair = load_reward(f"r=hf:{bert_dir}#logit[0],input=pair")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(bert_dir)
    model = BertForSequenceClassification.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        ref = model(**tokenizer("user: hello there", "four", return_tensors="pt")).logits[0, 0].item()
    assert pair(chat, ["four"], show_progress=False)["r"] == pytest.approx([ref], abs=1e-5)


def test_classifier_batching_does_not_change_results(bert_dir):
    prompts, completions = PROMPTS * 2, COMPLETIONS[::-1] + COMPLETIONS
    one = load_reward(f"c=hf:{bert_dir}#softmax[1],batch_size=1")(
        prompts, completions, batch_size=1, show_progress=False)["c"]
    three = load_reward(f"c=hf:{bert_dir}#softmax[1]")(
        prompts, completions, batch_size=3, show_progress=False)["c"]
    inner = load_reward(f"c=hf:{bert_dir}#softmax[1],batch_size=2")(
        prompts, completions, batch_size=6, show_progress=False)["c"]
    assert three == pytest.approx(one, abs=1e-5)
    assert inner == pytest.approx(one, abs=1e-5)
    assert one[:3] == pytest.approx(one[3:][::-1], abs=1e-5)  # same texts, same scores


def test_gpt2_without_pad_token_scores_last_real_token(gpt2_dir):
    short, long = "four", "a dog ran in the park today on the mat"
    reward = load_reward(f"g=hf:{gpt2_dir}#logit[1]")
    model = reward.components[0].fn.model
    assert model.config.pad_token_id is not None  # set from eos
    alone = reward(["p"], [short], show_progress=False)["g"]
    padded = reward(["p", "p"], [short, long], show_progress=False)["g"]
    expected = _direct_logits(gpt2_dir, [short, long], GPT2ForSequenceClassification)[:, 1].tolist()
    assert alone == pytest.approx(expected[:1], abs=1e-5)
    assert padded == pytest.approx(expected, abs=1e-5)
    # guard that the check is meaningful: the pad (eos) position scores differently
    assert abs(expected[0] - expected[1]) > 1e-4


# --------------------------------------------------------------------------- errors


def test_unknown_module():
    with pytest.raises(RewardSpecError, match=r"cannot import module 'no_such_mod_xyz' \(ModuleNotFoundError"):
        load_reward("no_such_mod_xyz:f")


def test_missing_function_and_not_callable(reward_module):
    with pytest.raises(RewardSpecError, match=rf"'{reward_module}:missing'.*has no function 'missing'"):
        load_reward(f"{reward_module}:missing")
    with pytest.raises(RewardSpecError, match="NOT_CALLABLE.*not callable"):
        load_reward(f"{reward_module}:NOT_CALLABLE")


def test_bad_file_and_bad_syntax(tmp_path):
    with pytest.raises(RewardSpecError, match="does not exist"):
        load_reward(f"{tmp_path}/absent.py:f")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(RewardSpecError, match=r"cannot import file .*SyntaxError"):
        load_reward(f"{broken}:f")


def test_bad_spec_text(reward_module):
    with pytest.raises(RewardSpecError, match="weight 'abc' is not a number"):
        load_reward(f"abc*{reward_module}:length")
    with pytest.raises(RewardSpecError, match="expected 'module.path:function'"):
        load_reward("justaname")
    with pytest.raises(RewardSpecError, match="empty term"):
        load_reward(f"{reward_module}:length + ")


def test_bad_transform_and_options(bert_dir):
    with pytest.raises(RewardSpecError, match=r"unknown transform 'tanh' \(expected sigmoid, softmax or logit\)"):
        load_reward(f"hf:{bert_dir}#tanh[0]")
    with pytest.raises(RewardSpecError, match=r"softmax\[2\] is out of range: the model has 2 label"):
        load_reward(f"hf:{bert_dir}#softmax[2]")
    with pytest.raises(RewardSpecError, match="unknown option 'colour'"):
        load_reward(f"hf:{bert_dir}#logit,colour=red")
    with pytest.raises(RewardSpecError, match="max_length 'big' is not an integer"):
        load_reward(f"hf:{bert_dir}#logit,max_length=big")


def test_missing_model_offline(tmp_path):
    with pytest.raises(RewardSpecError, match="model path 'nobody/no-model' does not exist and HF_HUB_OFFLINE is set"):
        load_reward("hf:nobody/no-model")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(RewardSpecError, match="cannot load classifier"):
        load_reward(f"hf:{empty}")


@pytest.mark.parametrize("fn, pattern", [
    ("wrong_length", r"'wrong_length' \(.*:wrong_length\) returned 4 scores for a batch of 3"),
    ("with_nan", r"'with_nan' .* non-finite score at row 1: nan"),
    ("with_string", r"'with_string' .* non-number at row 0: 'high'"),
    ("with_none", r"'with_none' .* non-number at row 1: None"),
])
def test_bad_outputs(reward_module, fn, pattern):
    reward = load_reward(f"{reward_module}:{fn}")
    with pytest.raises(RewardOutputError, match=pattern):
        reward(PROMPTS, COMPLETIONS, show_progress=False)


def test_bad_output_reports_global_row():
    def nan_on_bad(prompts, completions, **kw):
        return [float("nan") if c == "bad" else 1.0 for c in completions]

    reward = RewardFunction.from_callables({"n": nan_on_bad})
    with pytest.raises(RewardOutputError, match=r"'n' \(.*nan_on_bad\) .* at row 3: nan"):
        reward(["p"] * 4, ["ok", "ok", "ok", "bad"], batch_size=2, show_progress=False)


def test_duplicate_and_reserved_names(reward_module):
    with pytest.raises(RewardSpecError, match="duplicate component name 'length'"):
        load_reward(f"{reward_module}:length + 2*{reward_module}:length")
    with pytest.raises(RewardSpecError, match="'final_reward' is reserved"):
        load_reward(f"final_reward={reward_module}:length")
    fn = lambda prompts, completions, **kw: [0.0] * len(prompts)  # noqa: E731
    with pytest.raises(RewardSpecError, match="duplicate component name 'x'"):
        RewardFunction([RewardComponent("x", 1.0, fn, "a"), RewardComponent("x", 1.0, fn, "b")])


def test_misaligned_columns(reward_module):
    reward = load_reward(f"{reward_module}:bonus")
    with pytest.raises(ValueError, match="column 'bonus' has 2 values for 3 prompts"):
        reward(PROMPTS, COMPLETIONS, bonus=[1, 2], show_progress=False)
    assert math.isfinite(reward(PROMPTS, COMPLETIONS, bonus=[1, 2, 3], show_progress=False)["final_reward"][2])
