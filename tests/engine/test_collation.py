"""Batched collation (no mid-padding) gives exactly the log-probs of unpadded single-row forwards."""
import pytest
import torch

from lolrl.engine.collation import Collator, Tokenizer, group_by_length, padding_ratio
from lolrl.engine.data import Record
from lolrl.engine.modeling import load_model, load_tokenizer, packing_is_exact, response_logprobs
from lolrl.utils.errors import ConfigError

RECORDS = [
    Record("a", "user: tell me about cats\nbot:", "sure i am glad to help with cats", 1.0),
    Record("b", "user: tell me about a very long and winding river of stars and trains\nbot:", "no", 0.0),
    Record("c", "hi", "please enjoy music you are welcome kind regards and thanks", 0.5),
]


def _single_row_logprobs(model, collator, rows):
    return [response_logprobs(model, collator([row]))[0][0] for row in rows]


@pytest.mark.parametrize("kind", ["causal", "seq2seq", "llama"])
def test_batched_logprobs_equal_single_row(tiny_models, kind):
    tokenizer = load_tokenizer(tiny_models[kind])
    model = load_model(tiny_models[kind]).eval()
    encdec = kind == "seq2seq"
    rows = Tokenizer(tokenizer, encdec, 64, 32)(RECORDS)
    collator = Collator(tokenizer.pad_token_id, encdec, model.config.decoder_start_token_id if encdec else None)
    with torch.no_grad():
        batched, mask, states = response_logprobs(model, collator(rows), return_prompt_states=True)
        singles = _single_row_logprobs(model, collator, rows)
        for i, row in enumerate(rows):
            n = len(row.response_ids)
            assert mask[i].sum() == n
            torch.testing.assert_close(batched[i, :n], singles[i], atol=1e-5, rtol=0)
            assert states[i].shape[0] == len(row.prompt_ids)


@pytest.mark.parametrize("kind", ["causal", "llama"])
def test_packed_logprobs_equal_single_row(tiny_models, kind):
    """One packed sequence, no padding, positions restarting per row: the same log-probs and prompt states."""
    tokenizer = load_tokenizer(tiny_models[kind])
    model = load_model(tiny_models[kind]).eval()
    rows = Tokenizer(tokenizer, False, 64, 32)(RECORDS)
    packed = Collator(tokenizer.pad_token_id, False, pack=True)(rows)
    assert packed["input_ids"].shape == (1, sum(r.length for r in rows)) and padding_ratio(packed) == 1.0
    with torch.no_grad():
        logprobs, _, states = response_logprobs(model, packed, return_prompt_states=True)
        _, _, padded_states = response_logprobs(model, Collator(tokenizer.pad_token_id, False)(rows), True)
        for i, single in enumerate(_single_row_logprobs(model, Collator(tokenizer.pad_token_id, False), rows)):
            torch.testing.assert_close(logprobs[i, : len(rows[i].response_ids)], single, atol=1e-5, rtol=0)
            torch.testing.assert_close(states[i], padded_states[i], atol=1e-5, rtol=0)
    assert packing_is_exact(model, rows, tokenizer.pad_token_id)


def test_packing_probe_rejects_a_model_that_ignores_it(tiny_models):
    """A model whose attention ignores position-id packing must be caught, not silently trained wrong."""
    tokenizer = load_tokenizer(tiny_models["llama"])
    model = load_model(tiny_models["llama"]).eval()
    rows = Tokenizer(tokenizer, False, 64, 32)(RECORDS)
    original = model.forward

    def without_packing(*args, position_ids=None, **kwargs):  # what an older attention implementation does
        return original(*args, **kwargs)

    model.forward = without_packing
    assert not packing_is_exact(model, rows, tokenizer.pad_token_id)


def test_causal_layout_has_no_padding_between_prompt_and_response(tiny_models):
    tokenizer = load_tokenizer(tiny_models["causal"])
    rows = Tokenizer(tokenizer, False, 64, 32)(RECORDS)
    batch = Collator(tokenizer.pad_token_id, False)(rows)
    for i, row in enumerate(rows):
        n = row.length
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert batch["input_ids"][i, :n].tolist() == row.prompt_ids + row.response_ids
        # target t is input token t+1; the scored targets are exactly the response tokens
        scored = batch["target_ids"][i][batch["target_mask"][i].bool()].tolist()
        assert scored == row.response_ids
        assert batch["prompt_mask"][i].sum() == len(row.prompt_ids)


def test_truncation_and_eos(tiny_models):
    tokenizer = load_tokenizer(tiny_models["causal"])
    tok = Tokenizer(tokenizer, False, max_prompt_length=4, max_resp_length=3)
    long = Record("x", "one two three four five six seven", "a b c d e f", 1.0)
    row = tok([long])[0]
    full_prompt = tokenizer(long.prompt)["input_ids"]
    assert row.prompt_ids == full_prompt[-4:]  # prompts keep their end
    assert len(row.response_ids) == 3
    short = tok([Record("y", "p", "ok", 1.0)])[0]
    assert short.response_ids[-1] == tokenizer.eos_token_id  # responses end with EOS


def test_chat_prompt_uses_template(tiny_models):
    tokenizer = load_tokenizer(tiny_models["causal"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}bot:"
    row = Tokenizer(tokenizer, False)([Record("x", [{"role": "user", "content": "hi"}], "ok", 1.0)])[0]
    assert tokenizer.decode(row.prompt_ids) == "user: hi\nbot:"


def test_group_by_length_keeps_the_multiset():
    indices = [5, 1, 1, 3, 0, 2, 4, 5]
    lengths = [10, 1, 7, 3, 9, 2]
    grouped = group_by_length(indices, lengths, batch_size=2, window=4, seed=1)
    assert sorted(grouped) == sorted(indices)
    batches = [grouped[i:i + 2] for i in range(0, 8, 2)]
    # one window holds all 8 draws: batches are consecutive pairs in length order, in shuffled order
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[1, 1], [2, 2], [3, 7], [9, 10]]


def test_auto_packing_only_with_a_varlen_attention_kernel(tiny_models):
    """SDPA/eager attention over a packed batch costs O(total^2): auto keeps padded, length-grouped rows."""
    from lolrl.engine.modeling import choose_packing

    tokenizer = load_tokenizer(tiny_models["llama"])
    model = load_model(tiny_models["llama"]).eval()
    rows = Tokenizer(tokenizer, False, 64, 32)(RECORDS)
    assert model.config._attn_implementation not in ("flash_attention_2", "flash_attention_3")
    assert not choose_packing(model, rows, tokenizer.pad_token_id, "auto")
    assert choose_packing(model, rows, tokenizer.pad_token_id, "on")
    assert not choose_packing(model, rows, tokenizer.pad_token_id, "off")


def test_varlen_packing_carries_the_row_boundaries_as_transformers_flattening_does():
    """cu_seq_lens_q/k and max_length_q/k of a hand-built batch, and the same as transformers'
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives for the same sequences."""
    from transformers import DataCollatorWithFlattening

    from lolrl.engine.collation import TokenizedRow
    from lolrl.engine.modeling import _model_inputs

    rows = [TokenizedRow(0, [1, 2, 3], [4, 5]), TokenizedRow(1, [6], [7, 8, 9]), TokenizedRow(2, [10, 11], [12])]
    batch = Collator(0, False, pack="varlen")(rows)
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 5, 9, 12]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert int(batch["max_length_q"]) == int(batch["max_length_k"]) == 5
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert "attention_mask" not in batch
    reference = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(
        [{"input_ids": r.prompt_ids + r.response_ids} for r in rows])
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["position_ids"], reference["position_ids"])
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(batch[key], reference[key]) and batch[key].dtype == reference[key].dtype
    inputs = _model_inputs(batch)  # what the model is called with: max lengths as Python ints
    assert inputs["max_length_q"] == reference["max_length_q"] and isinstance(inputs["max_length_k"], int)
    # the position-id layout has no boundaries; an unknown layout is refused
    assert "cu_seq_lens_q" not in Collator(0, False, pack=True)(rows)
    with pytest.raises(ValueError):
        Collator(0, False, pack="flash")


def test_varlen_attention_is_recognised_and_packs_in_the_varlen_layout(tiny_models, monkeypatch):
    from lolrl.engine.modeling import choose_packing, has_varlen_attention

    tokenizer = load_tokenizer(tiny_models["llama"])
    model = load_model(tiny_models["llama"]).eval()
    rows = Tokenizer(tokenizer, False, 64, 32)(RECORDS)
    assert not has_varlen_attention(model) and choose_packing(model, rows, tokenizer.pad_token_id, "on") == "positions"
    for impl in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "paged|flash_attention_2"):
        monkeypatch.setattr(model.config, "_attn_implementation", impl, raising=False)
        assert has_varlen_attention(model), impl
    seen = []
    import lolrl.engine.modeling as modeling

    monkeypatch.setattr(modeling, "packing_is_exact", lambda m, r, p, tol, layout: seen.append(layout) or True)
    assert choose_packing(model, rows, tokenizer.pad_token_id, "auto") == "varlen" and seen == ["varlen"]


def test_prompt_passes_group_rows_by_prompt_length():
    """Prompt states pad prompts only: grouping by the whole row's length would pair a long prompt
    with a short one (here: rows of equal total length, prompts of 2 and 9 tokens)."""
    from lolrl.engine.collation import TokenizedRow, length_grouped_batches

    rows = [TokenizedRow(i, [1] * p, [2] * (10 - p)) for i, p in enumerate([2, 9, 2, 9])]
    by_prompt = length_grouped_batches(rows, 2, prompt_only=True)
    assert [[len(r.prompt_ids) for r in b] for b in by_prompt] == [[2, 2], [9, 9]]
    by_row = length_grouped_batches(rows, 2)
    assert [[len(r.prompt_ids) for r in b] for b in by_row] == [[2, 9], [2, 9]]  # stable sort on equal totals


def test_prompt_states_batches_bound_their_padding():
    """Prompts of 10, 11, 12, 20, 40, 41 tokens, batch size 4, at most 1.25 padded tokens per real one
    (by hand: {10, 11, 12}: 36 <= 1.25 * 33; + 20: 80 > 1.25 * 53, new batch; {20}: + 40: 80 > 75, new;
    {40, 41}: 82 <= 101). Without the bound: [10, 11, 12, 20] padded to 80 for 53 tokens, [40, 41]."""
    from lolrl.engine.collation import TokenizedRow, length_grouped_batches
    from lolrl.engine.reference import PROMPT_PADDING

    rows = [TokenizedRow(i, [1] * p, [2]) for i, p in enumerate([40, 10, 20, 12, 41, 11])]
    bounded = length_grouped_batches(rows, 4, prompt_only=True, max_padding=1.25)
    assert [[len(r.prompt_ids) for r in b] for b in bounded] == [[10, 11, 12], [20], [40, 41]]
    plain = length_grouped_batches(rows, 4, prompt_only=True)
    assert [[len(r.prompt_ids) for r in b] for b in plain] == [[10, 11, 12, 20], [40, 41]]
    assert [[len(r.prompt_ids) for r in b] for b in length_grouped_batches(rows, 2, True, 1.25)] == \
        [[10, 11], [12, 20], [40, 41]]  # the batch size still caps a batch; {12, 20}: 40 <= 1.25 * 32 (inclusive)
    assert PROMPT_PADDING == 1.25


# ----------------------------------------------------------------- special tokens and truncation (issue 22)
TEMPLATES = {"bos": ("<s> $A", {"bos_token": "<s>", "eos_token": "<eos>"}),  # Llama-style: BOS first
             "eos": ("$A </s>", {"eos_token": "</s>"}),  # T5-style: EOS last
             "bos_eos": ("<s> $A </s>", {"bos_token": "<s>", "eos_token": "</s>"})}


@pytest.fixture(scope="module")
def special_tokenizers(tiny_models, tmp_path_factory):
    """The tests' GPT-2-style tokenizer (adds nothing) and three built from it with a TemplateProcessing
    post-processor that adds BOS, EOS or both; the BOS one with a tiny GPT-2 of its vocabulary."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from lolrl.demo.tiny import build_causal_lm

    base = load_tokenizer(tiny_models["causal"])
    out = {"none": (base, tiny_models["causal"])}
    for name, (single, specials) in TEMPLATES.items():
        raw = RawTokenizer.from_str(base.backend_tokenizer.to_str())
        raw.add_special_tokens(["<s>", "</s>"])
        raw.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[(t, raw.token_to_id(t)) for t in ("<s>", "</s>") if t in single])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **specials)
        directory = tmp_path_factory.mktemp(f"tok_{name}")
        tokenizer.save_pretrained(str(directory))
        if name == "bos":
            build_causal_lm(tokenizer, directory, n_layer=1, n_embd=16, n_head=2, dropout=0.0)
        out[name] = (load_tokenizer(str(directory)), str(directory))
    return out


@pytest.mark.parametrize("kind", ["none", "bos", "eos", "bos_eos"])
def test_left_truncation_keeps_the_special_tokens(special_tokenizers, kind):
    """A prompt over max_prompt_length loses its first text tokens, never BOS (nor a T5-style EOS):
    the tokenizer's specials around the prompt's last tokens, max_prompt_length in all."""
    tokenizer = special_tokenizers[kind][0]
    text = "user: tell me about a very long and winding river of stars and trains\nbot:"
    full, content = tokenizer(text)["input_ids"], tokenizer(text, add_special_tokens=False)["input_ids"]
    head = [tokenizer.bos_token_id] if kind.startswith("bos") else []
    tail = [tokenizer.eos_token_id] if kind.endswith("eos") else []
    assert full == head + content + tail and len(content) > 8
    for limit in (len(head) + len(tail) + 1, 8, len(full) - 1):
        ids = Tokenizer(tokenizer, False, max_prompt_length=limit)([Record("x", text, "ok", 1.0)])[0].prompt_ids
        assert ids == head + content[len(content) - (limit - len(head) - len(tail)):] + tail, limit
        assert len(ids) == limit
    assert Tokenizer(tokenizer, False, max_prompt_length=len(full))([Record("x", text, "ok")])[0].prompt_ids == full
    if head or tail:
        with pytest.raises(ConfigError, match="no room"):
            Tokenizer(tokenizer, False, max_prompt_length=len(head) + len(tail))([Record("x", text, "ok")])


def test_left_truncation_of_a_chat_prompt_keeps_the_templates_bos(special_tokenizers):
    """A chat template that writes BOS as text: a truncated chat prompt still starts with it and ends
    with the template's assistant cue."""
    tokenizer = special_tokenizers["bos"][0]
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                               "{% endfor %}bot:")
    messages = [{"role": "user", "content": "tell me about a very long and winding river of stars and trains"}]
    whole = Tokenizer(tokenizer, False, max_prompt_length=512)([Record("x", messages, "ok")])[0].prompt_ids
    assert whole[0] == tokenizer.bos_token_id and whole.count(tokenizer.bos_token_id) == 1
    cut = Tokenizer(tokenizer, False, max_prompt_length=6)([Record("x", messages, "ok")])[0].prompt_ids
    assert cut == whole[:1] + whole[-5:]


@pytest.mark.parametrize("kind", ["none", "bos"])
@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("longest", [True, False])
def test_empty_prompt_scores_exactly_its_response_tokens(special_tokenizers, kind, pack, longest):
    """An empty prompt (its row the longest of the batch, or not): with a tokenizer that adds no token it
    starts from EOS (GPT-2's start; BOS where there is one), with a BOS tokenizer from BOS; either way the
    batched log-probs are those of a hand computation over exactly the response tokens."""
    tokenizer, path = special_tokenizers[kind]
    model = load_model(path).eval()
    response = "sure i am glad to help with cats and music and trains" if longest else "ok"
    records = [Record("e", "", response, 1.0), Record("s", "hi", "no", 0.0),
               Record("t", "user: cats\nbot:", "please enjoy", 0.5)]
    rows = Tokenizer(tokenizer, False, 64, 64)(records)
    assert rows[0].response_ids == tokenizer(response, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    assert (rows[0].length == max(r.length for r in rows)) is longest
    with torch.no_grad():
        logprobs, mask, _ = response_logprobs(model, Collator(tokenizer.pad_token_id or 0, False, pack=pack)(rows))
        for i, row in enumerate(rows):
            ids = row.prompt_ids + row.response_ids
            by_hand = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            want = [by_hand[t - 1, ids[t]].item() for t in range(len(row.prompt_ids), len(ids))]
            assert int(mask[i].sum()) == len(row.response_ids)
            assert logprobs[i, : len(want)].tolist() == pytest.approx(want, abs=1e-5)
    assert rows[0].prompt_ids == [tokenizer.bos_token_id if kind == "bos" else tokenizer.eos_token_id]
