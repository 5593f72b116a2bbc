"""Decoding is ours alone: every setting is passed to generate(), so neither transformers' global
defaults (top_k=50) nor a checkpoint's generation_config.json change what is generated, and every
setting is in the cache keys of generated outputs."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from lolrl.engine.collation import Tokenizer
from lolrl.engine.config import OfflineRLConfig
from lolrl.engine.data import load_task_dir
from lolrl.engine.generation import GenerationSettings, generate
from lolrl.engine.modeling import load_model, load_tokenizer
from lolrl.engine.rewards import RewardFunction
from lolrl.engine.trainer import OfflineRLTrainer

# What a checkpoint's generation_config.json may say; none of it may reach our decoding.
MODEL_DEFAULTS = dict(do_sample=True, num_beams=3, top_k=1, temperature=0.1, top_p=0.5, repetition_penalty=4.0,
                      no_repeat_ngram_size=1,
                      min_p=0.5, typical_p=0.5, length_penalty=-3.0, min_new_tokens=6)


@pytest.fixture(scope="module")
def opinionated_model(tiny_models, tmp_path_factory):
    """The tiny GPT-2 copied with a generation_config.json full of decoding defaults."""
    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("opinionated") / "causal"
    shutil.copytree(tiny_models["causal"], folder)
    GenerationConfig(**MODEL_DEFAULTS).save_pretrained(folder)
    assert load_model(str(folder)).generation_config.top_k == 1  # it is read on load
    return str(folder)


def _texts(model_dir, toy_dir, settings, seed=0):
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    rows = Tokenizer(tokenizer, False, 64, 16)(load_task_dir(toy_dir).val)
    torch.manual_seed(seed)
    return generate(model, tokenizer, rows, settings, batch_size=4)


SAMPLED = GenerationSettings(max_new_tokens=12, num_beams=1, repetition_penalty=1.0, do_sample=True)


@pytest.mark.parametrize("settings", [SAMPLED, GenerationSettings(max_new_tokens=12),
                                      dataclasses.replace(SAMPLED, top_k=5, top_p=0.9, temperature=0.7)],
                         ids=["pure_sampling", "beam_search", "sampling_with_cuts"])
def test_a_models_generation_config_does_not_change_our_decoding(tiny_models, opinionated_model, toy_dir, settings):
    plain = _texts(tiny_models["causal"], toy_dir, settings)
    assert _texts(opinionated_model, toy_dir, settings) == plain


def test_pure_sampling_has_no_implicit_top_k(tiny_models, opinionated_model):
    """The generation config transformers resolves from our arguments: top-k off (not its default 50,
    not the checkpoint's 1), and every other setting as passed, whatever the checkpoint says."""
    from transformers import GenerationConfig

    from lolrl.engine.generation import NEUTRAL_DECODING, _generate_kwargs

    tokenizer = load_tokenizer(tiny_models["causal"])
    for folder in (tiny_models["causal"], opinionated_model):
        model = load_model(folder)
        resolved, _ = model._prepare_generation_config(None, **_generate_kwargs(tokenizer, SAMPLED))
        assert resolved.top_k in (None, 0) and resolved.temperature == 1.0 and resolved.top_p == 1.0
        assert resolved.repetition_penalty == 1.0 and resolved.do_sample and resolved.num_beams == 1
        known = GenerationConfig().to_dict()
        for name, value in NEUTRAL_DECODING.items():
            if name in known:
                assert getattr(resolved, name) == value, name


def test_every_generation_config_field_is_decided():
    """A field a newer transformers adds must be classified (passed, or harmless) before it can leak."""
    from transformers import GenerationConfig

    from lolrl.engine.generation import NEUTRAL_DECODING, OUTPUT_ONLY

    ours = {f.name for f in dataclasses.fields(GenerationSettings)}
    undecided = set(GenerationConfig().to_dict()) - set(NEUTRAL_DECODING) - OUTPUT_ONLY - ours
    assert not undecided


def test_value_sampling_is_pure_sampling(tmp_path, tiny_models):
    config = OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path), algorithm="a_lol",
                             value_samples=2)
    settings = OfflineRLTrainer.value_sampling_settings(type("T", (), {"args": config})())
    assert (settings.do_sample, settings.num_beams, settings.temperature, settings.top_p, settings.top_k,
            settings.repetition_penalty) == (True, 1, 1.0, 1.0, 0, 1.0)
    assert settings.max_new_tokens == config.generation.max_new_tokens


def test_every_decoding_setting_is_in_the_cache_key(tmp_path, tiny_models, toy_dir, monkeypatch):
    """--value_samples K caches its scored samples: a change of any decoding setting (ours, or one of the
    fixed ones) is a cache miss, the same settings a hit."""
    from lolrl.engine import generation

    base = GenerationSettings(max_new_tokens=6, num_beams=1, repetition_penalty=1.0, do_sample=True)
    changes = dict(max_new_tokens=5, num_beams=2, repetition_penalty=1.3, temperature=0.7, top_p=0.9, top_k=7,
                   stop_token_ids=[3], stop_texts=["."])
    assert set(changes) | {"do_sample"} == {f.name for f in dataclasses.fields(GenerationSettings)}
    keys = {repr(base.as_dict())} | {repr(dataclasses.replace(base, **{k: v}).as_dict()) for k, v in changes.items()}
    assert len(keys) == len(changes) + 1

    calls = []

    def n_words(prompts, completions, **_):
        calls.append(len(completions))
        return [float(len(c.split())) for c in completions]

    def targets(generation):
        config = OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path / "run"), algorithm="a_lol",
                                 max_resp_length=6, per_device_eval_batch_size=8, value_samples=2,
                                 generation=generation)
        trainer = OfflineRLTrainer(args=config, data=load_task_dir(toy_dir),
                                   reward=RewardFunction.from_callables({"n": n_words}))
        before = len(calls)
        values = trainer.value_targets(trainer.row_tokenizer(trainer._val_records()))
        return values, len(calls) > before  # whether it generated and scored (a cache miss)

    first, missed = targets(base)
    assert missed
    assert targets(base) == (first, False)  # the same settings: from the cache
    assert targets(dataclasses.replace(base, top_k=3))[1]
    monkeypatch.setitem(generation.NEUTRAL_DECODING, "typical_p", 0.9)
    assert targets(base)[1]
    assert np.isfinite(first).all()


@pytest.mark.parametrize("model", ["causal", "llama", "seq2seq", "causal+lora"])
@pytest.mark.parametrize("beams", [1, 2])
def test_the_generations_prefill_gives_the_prompt_states(tiny_models, toy_dir, model, beams):
    """pi_ref's validation generation also gives V(x)'s features: each prompt's states as the prefill computed
    them (left-padded in batches, every beam's copy; T5: the encoder's output; a peft model's, its adapter on)
    equal the states of a forward of their own to rounding; the texts are those of a plain generation; the
    prefill alone (the generations from a cache) gives the same states bit for bit."""
    from lolrl.engine.generation import generate_with_prompt_states, prefill_prompt_states
    from lolrl.engine.modeling import LoraSettings, add_lora
    from lolrl.engine.reference import prompt_states

    base, plain = model.removesuffix("+lora"), None
    lm, tokenizer = load_model(tiny_models[base]), load_tokenizer(tiny_models[base])
    if base != model:
        plain = prompt_states(lm, Tokenizer(tokenizer, False, 64, 16)(load_task_dir(toy_dir).val[:2]),
                              tokenizer.pad_token_id, batch_size=2)
        lm = add_lora(lm, LoraSettings(r=4, dropout=0.0))
        torch.manual_seed(0)
        for name, weight in lm.named_parameters():
            if "lora_B" in name:
                weight.data.normal_(0.0, 0.5)  # an adapter that changes the states
    rows = Tokenizer(tokenizer, base == "seq2seq", 64, 16)(load_task_dir(toy_dir).val)
    assert len({len(r.prompt_ids) for r in rows}) > 3  # batches with padding
    settings = GenerationSettings(max_new_tokens=6, num_beams=beams)
    texts, states = generate_with_prompt_states(lm, tokenizer, rows, settings, batch_size=5)
    assert texts == generate(lm, tokenizer, rows, settings, batch_size=5)
    forward = prompt_states(lm, rows, tokenizer.pad_token_id, batch_size=3)
    assert [s.shape for s in states] == [(len(r.prompt_ids), lm.config.hidden_size) for r in rows]
    for prefill, own in zip(states, forward):
        assert prefill.dtype == torch.float32
        torch.testing.assert_close(prefill, own, atol=1e-5, rtol=1e-5)
    again = prefill_prompt_states(lm, tokenizer, rows, settings, batch_size=5)
    assert all(torch.equal(a, b) for a, b in zip(again, states))
    if plain is not None:
        assert not torch.allclose(states[0], plain[0], atol=1e-3)  # the adapter's states, not the base's


def test_prefill_states_are_refused_where_the_output_layer_changes_the_bodys_output(tiny_models, toy_dir):
    """The prefill's states are the output layer's input only if the model feeds it the body's output unchanged; a
    model that transforms it in between is refused in one line, not fit on states the reference pass never sees."""
    from lolrl.engine.generation import generate_with_prompt_states
    from lolrl.utils.errors import ConfigError

    lm, tokenizer = load_model(tiny_models["causal"]), load_tokenizer(tiny_models["causal"])
    rows = Tokenizer(tokenizer, False, 64, 16)(load_task_dir(toy_dir).val[:4])
    settings = GenerationSettings(max_new_tokens=3, num_beams=1)
    assert len(generate_with_prompt_states(lm, tokenizer, rows, settings, batch_size=2)[1]) == 4
    lm.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0] * 2.0,))
    with pytest.raises(ConfigError, match="does not take its body's output"):
        generate_with_prompt_states(lm, tokenizer, rows, settings, batch_size=2)
