"""Batched generation with the KV cache, prompts sorted by length, each row stopping at its own EOS.

Causal prompts are left-padded here (generation appends on the right); ``generate`` derives
positions from the attention mask, so a prompt gets the same positions as in training.
With several processes each one generates its share and the results are gathered once.

:func:`generate_with_prompt_states` also keeps the prompts' last-layer states as the generation's own
prefill computes them (:class:`PrefillStates`), so pi_ref's validation generation gives the value head its
features without a forward of their own; :func:`prefill_prompt_states` recomputes exactly those states (the
same calls, stopped after the prefill) when the generations come from a cache.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lolrl.engine.collation import TokenizedRow, length_grouped_batches, pad_prompts
from lolrl.engine.modeling import unwrap
from lolrl.utils.cli import setting
from lolrl.utils.errors import ConfigError

logger = logging.getLogger(__name__)

# Every other ``generate()`` setting that changes which tokens come out, at the value that switches it
# off. transformers fills a setting that ``generate()`` is not given from the model's own
# generation_config.json, then from its global defaults (top_k=50 among them): so each one is passed,
# always, and a checkpoint's generation_config.json (top_k=20, temperature=0.6, ...) changes nothing.
# tests/engine/test_generation.py checks that every field of the installed GenerationConfig is here,
# in GenerationSettings, or in OUTPUT_ONLY.
NEUTRAL_DECODING = {
    # length and beam search
    "min_length": 0, "min_new_tokens": None, "max_time": None, "stop_strings": None, "early_stopping": False,
    "length_penalty": 1.0, "num_return_sequences": 1,
    # sampling warpers (used when do_sample)
    "typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    # logits processors
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "renormalize_logits": False, "guidance_scale": None, "watermarking_config": None,
    "token_healing": False,
    # other decoding strategies a generation_config.json can switch on
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None, "dola_layers": None, "constraints": None,
    "force_words_ids": None, "prompt_lookup_num_tokens": None, "use_mtp": None,
}

# GenerationConfig fields that do not change the tokens generated (what is returned, caching, speculative
# decoding with an assistant model we never pass, ids that come from the tokenizer or the model's structure).
OUTPUT_ONLY = frozenset({
    "max_length",  # max_new_tokens, always passed, takes precedence
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "output_attentions", "output_hidden_states",
    "output_scores", "output_logits", "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
    "max_matching_ngram_size", "assistant_ensemble_weight", "speculation_type", "compile_config", "disable_compile",
    "continuous_batching_config", "low_memory", "prefill_chunk_size", "_from_model_config", "transformers_version",
})


@dataclass
class GenerationSettings:
    """Decoding. The defaults are the original code's: 2 beams, repetition penalty 2.5, no sampling.
    Everything else ``generate()`` could take from the model's generation_config.json is fixed to
    off (:data:`NEUTRAL_DECODING`); ``top_k`` 0 is no top-k cut (transformers' own default is 50)."""

    max_new_tokens: int | None = setting(None, "tokens generated; none: the run's max_resp_length", min=1)
    num_beams: int = setting(2, "beams (the original's 2)", min=1)
    repetition_penalty: float = setting(2.5, "repetition penalty (the original's 2.5)")
    do_sample: bool = setting(False, "sample instead of beam search")
    temperature: float = setting(1.0, "sampling temperature", min=0.0)
    top_p: float = setting(1.0, "nucleus sampling", min=0.0, max=1.0)
    top_k: int = setting(0, "top-k sampling (0: no top-k cut)", min=0)
    stop_token_ids: list[int] = setting([], "token ids that also end a generation, besides EOS")
    stop_texts: list[str] = setting([], "texts that also end a generation (each must be one token of the "
                                        "tokenizer; e.g. COMET's '.', HH's '###')")

    def as_dict(self) -> dict:
        """Every decoding setting ``generate()`` receives (ours and the fixed ones): what cache keys hold."""
        return {**self.__dict__, "fixed": dict(NEUTRAL_DECODING)}


def stop_text_ids(tokenizer, texts) -> list[int]:
    """The token id of each stop text as it appears after other text (the last id of ``encode("a" + text)``,
    checked to be one token after ``"a"``: SentencePiece adds a ``▁`` of its own to a leading space); a
    text that is not one token is left to the post-processing, with a warning."""
    head = tokenizer.encode("a", add_special_tokens=False)
    out = []
    for text in texts:
        ids = tokenizer.encode("a" + text, add_special_tokens=False)
        if len(ids) == len(head) + 1 and ids[:len(head)] == head:
            out.append(ids[-1])
        else:
            logger.warning("stop text %r is not one token of this tokenizer: generation does not stop there", text)
    return out


def with_stop_texts(settings: GenerationSettings, tokenizer, texts=()) -> GenerationSettings:
    """``settings`` with its ``stop_texts`` (and ``texts``) added to ``stop_token_ids`` as ids of ``tokenizer``."""
    ids = [i for i in stop_text_ids(tokenizer, [*settings.stop_texts, *texts]) if i not in settings.stop_token_ids]
    return dataclasses.replace(settings, stop_token_ids=[*settings.stop_token_ids, *ids]) if ids else settings


def _stop_ids(tokenizer, settings: GenerationSettings) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return eos + list(settings.stop_token_ids)


def _generate_kwargs(tokenizer, settings: GenerationSettings) -> dict:
    """Every decoding setting, explicitly (the ones this transformers version knows): nothing is left for
    ``generate()`` to fill from the model's generation_config.json or from its global defaults. No top-k
    is ``top_k=None`` (what transformers reads as no cut; 0 reads the same but is flagged when not sampling)."""
    from transformers import GenerationConfig

    if settings.max_new_tokens is None:
        raise ValueError("GenerationSettings.max_new_tokens is unset (the config fills it with max_resp_length)")
    known = GenerationConfig().to_dict()
    fixed = {k: v for k, v in NEUTRAL_DECODING.items() if k in known}
    return {**fixed, "max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams,
            "repetition_penalty": settings.repetition_penalty, "do_sample": settings.do_sample,
            "temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k or None,
            "eos_token_id": _stop_ids(tokenizer, settings) or None, "pad_token_id": tokenizer.pad_token_id}


def sharded_parameters(accelerator) -> bool:
    """Whether the weights are sharded across processes (DeepSpeed ZeRO-3 or FSDP): then every
    process must take part in every forward of ``generate`` (``synced_gpus``)."""
    if accelerator is None or accelerator.num_processes == 1:
        return False
    state = accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    zero3 = plugin is not None and getattr(plugin, "zero_stage", 0) == 3
    return zero3 or str(getattr(state, "distributed_type", "")).endswith("FSDP")


def batches_per_process(n_rows: int, num_processes: int, batch_size: int) -> int:
    """Generation batches of the busiest process when rows are dealt round-robin."""
    return math.ceil(math.ceil(n_rows / num_processes) / batch_size)


class PrefillStates:
    """Context manager around ``generate`` calls: each prompt's last-layer states as the call's prefill computes
    them, what :func:`lolrl.engine.modeling.last_hidden_states` computes in a forward of its own (decoder-only:
    the body's output, the output layer's input; seq2seq: the encoder's output). The hook takes the body's
    outputs until they cover the prompt (a prefill in chunks too) and nothing of the decoding steps after it;
    a beam search's prefill runs on every beam's copy of a prompt, of which the first is kept. Decoder-only, the
    output layer's input at the prefill's last position is checked to be the body's output there: a model that
    changes the states between the two is refused, not fit on other states than the reference pass's."""

    def __init__(self, model):
        inner = unwrap(model)
        if hasattr(inner, "get_base_model"):  # peft
            inner = inner.get_base_model()
        self.encoder_decoder = bool(getattr(inner.config, "is_encoder_decoder", False))
        self.body = inner.get_encoder() if self.encoder_decoder else inner.base_model
        self.head = None if self.encoder_decoder else inner.get_output_embeddings()
        if self.body is inner or (not self.encoder_decoder and self.head is None):
            raise ConfigError(f"{type(inner).__name__}: no model body (base_model_prefix) and output layer to take "
                              "V(x)'s prompt states from in the generation's prefill (with --value_source data or "
                              "--value_samples 2 or more they come from a forward of their own)")
        self.parts: list[torch.Tensor] = []
        self.wanted = 0
        self.head_input: torch.Tensor | None = None

    def expect(self, length: int) -> None:
        """The next ``generate`` call's prompt length (0: keep nothing of it)."""
        self.parts, self.wanted, self.head_input = [], length, None

    def _covered(self) -> int:
        return sum(part.shape[1] for part in self.parts)

    def _body_hook(self, module, args, output):
        if self._covered() < self.wanted:
            self.parts.append(output[0].detach().cpu())

    def _head_hook(self, module, args):
        if self.wanted and self.head_input is None and self._covered() == self.wanted:  # the prefill's last forward
            self.head_input = args[0][:, -1].detach().cpu()

    def take(self, rows: int) -> torch.Tensor:
        """The states of the call's ``rows`` prompts, [rows, L, H], as the prompts were padded."""
        states = torch.cat(self.parts, dim=1) if self.parts else None
        if states is None or states.shape[1] != self.wanted or states.shape[0] % rows:
            raise RuntimeError(f"the generation's prefill gave prompt states of shape "
                               f"{None if states is None else tuple(states.shape)} for {rows} prompts of "
                               f"{self.wanted} tokens")
        if self.head is not None and (self.head_input is None
                                      or not torch.equal(self.head_input.float(), states[:, -1].float())):
            raise ConfigError(f"{type(self.head).__name__}, the model's output layer, does not take its body's output "
                              "as it is: V(x)'s prompt states cannot come from the generation's prefill (with "
                              "--value_source data or --value_samples 2 or more they come from a forward of their own)")
        return states[:: states.shape[0] // rows]

    def __enter__(self):
        self._handles = [self.body.register_forward_hook(self._body_hook)]
        if self.head is not None:
            self._handles.append(self.head.register_forward_pre_hook(self._head_hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


class _AfterPrefill:
    """A stopping criterion: every sequence is done once the prefill has given its first token."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_local(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                   device, desc: str = "generate", show_progress: bool = True,
                   synced_batches: int | None = None) -> dict[int, str]:
    """Generate for ``rows`` on this process; returns ``{row.index: text}``. With ``synced_batches``
    (sharded weights) this process runs exactly that many ``generate`` calls with ``synced_gpus``,
    dummy ones where it has no rows left, so that no process waits for a collective alone."""
    return _generate_rows(model, tokenizer, rows, settings, batch_size, device, desc, show_progress,
                          synced_batches)[0]


@torch.no_grad()
def _generate_rows(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                   device, desc: str = "generate", show_progress: bool = True, synced_batches: int | None = None,
                   capture: bool = False, prefill_only: bool = False
                   ) -> tuple[dict[int, str], dict[int, torch.Tensor]]:
    """:func:`generate_local`'s texts and, with ``capture``, ``{row.index: prompt states}`` from each call's
    prefill (:class:`PrefillStates`); ``prefill_only``: each call stops after its first token (no texts)."""
    from contextlib import nullcontext

    from transformers import StoppingCriteriaList

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    kwargs = _generate_kwargs(tokenizer, settings)
    if prefill_only:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_AfterPrefill()])
    was_training = model.training
    model.eval()
    outputs: dict[int, str] = {}
    states: dict[int, torch.Tensor] = {}
    batches = length_grouped_batches(rows, batch_size, prompt_only=True)
    total = len(batches)
    if synced_batches is not None:
        kwargs["synced_gpus"] = True
        total = synced_batches
    with PrefillStates(model) if capture else nullcontext() as prefill:
        for k in tqdm(range(total), desc=desc, disable=not show_progress, leave=False):
            if k < len(batches):
                ids, mask = pad_prompts(batches[k], tokenizer.pad_token_id, left=not encoder_decoder)
            else:  # a batch this process does not need, only to keep it in step (output discarded)
                ids = torch.full((1, 1), tokenizer.pad_token_id)
                mask = torch.ones_like(ids)
            if prefill is not None:
                prefill.expect(ids.shape[1] if k < len(batches) else 0)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            if k >= len(batches):
                continue
            if prefill is not None:
                padded = prefill.take(len(batches[k]))
                for row, row_states in zip(batches[k], padded):  # causal prompts are left-padded
                    real = row_states[:len(row.prompt_ids)] if encoder_decoder else row_states[-len(row.prompt_ids):]
                    states[row.index] = real.to(torch.float32, copy=True)
            if not prefill_only:
                new_tokens = out if encoder_decoder else out[:, ids.shape[1]:]
                texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                outputs.update({row.index: text.strip() for row, text in zip(batches[k], texts)})
    model.train(was_training)
    return outputs, states


def generate(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
             accelerator=None, desc: str = "generate") -> list[str]:
    """Generate for every row, split across processes; the texts come back in row order."""
    return _on_processes(model, tokenizer, rows, settings, batch_size, accelerator, desc)[0]


def generate_with_prompt_states(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings,
                                batch_size: int, accelerator=None, desc: str = "generate"
                                ) -> tuple[list[str], list[torch.Tensor]]:
    """:func:`generate`, and each row's prompt states ([L_i, H], float32, on CPU) from the generation's own prefill
    (:class:`PrefillStates`)."""
    return _on_processes(model, tokenizer, rows, settings, batch_size, accelerator, desc, capture=True)


def prefill_prompt_states(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                          accelerator=None, desc: str = "prompt states (prefill)") -> list[torch.Tensor]:
    """The prompt states :func:`generate_with_prompt_states` gives for the same rows and settings, bit for bit, at
    the cost of the prefill alone: the same ``generate`` calls (the same batches, padding, beams and cache),
    each stopped after its first new token."""
    return _on_processes(model, tokenizer, rows, settings, batch_size, accelerator, desc, capture=True,
                         prefill_only=True)[1]


def _on_processes(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                  accelerator, desc: str, capture: bool = False, prefill_only: bool = False):
    """(texts, states) in row order (states None without ``capture``), each process generating its share."""
    if accelerator is None or accelerator.num_processes == 1:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
        texts, states = _generate_rows(model, tokenizer, rows, settings, batch_size, device, desc, capture=capture,
                                       prefill_only=prefill_only)
    else:
        from accelerate.utils import gather_object

        mine = rows[accelerator.process_index::accelerator.num_processes]
        synced = batches_per_process(len(rows), accelerator.num_processes, batch_size) \
            if sharded_parameters(accelerator) else None
        texts, states = {}, {}
        for part_texts, part_states in gather_object([_generate_rows(
                accelerator.unwrap_model(model), tokenizer, mine, settings, batch_size, accelerator.device, desc,
                show_progress=accelerator.is_local_main_process, synced_batches=synced, capture=capture,
                prefill_only=prefill_only)]):
            texts.update(part_texts)
            states.update(part_states)
    return ([texts[row.index] for row in rows] if not prefill_only else None,
            [states[row.index] for row in rows] if capture else None)


@torch.no_grad()
def generate_token_ids(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                       device) -> list[list[int]]:
    """The new tokens of each row (decoder-only, this process), in row order, up to and including
    the first stop token (EOS or ``settings.stop_token_ids``): what an online learner optimises."""
    kwargs = _generate_kwargs(tokenizer, settings)
    stops = set(_stop_ids(tokenizer, settings))
    was_training = model.training
    model.eval()
    outputs: dict[int, list[int]] = {}
    ordered = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids))
    for start in range(0, len(ordered), batch_size):
        batch = [rows[i] for i in ordered[start:start + batch_size]]
        ids, mask = pad_prompts(batch, tokenizer.pad_token_id, left=True)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for i, new in zip(ordered[start:start + batch_size], out[:, ids.shape[1]:].tolist()):
            end = next((k + 1 for k, token in enumerate(new) if token in stops), len(new))
            outputs[i] = new[:end]
    model.train(was_training)
    return [outputs[i] for i in range(len(rows))]
