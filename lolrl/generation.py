"""Batched generation with the KV cache, prompts sorted by length, each row stopping at its own EOS.

Causal prompts are left-padded here (generation appends on the right); ``generate`` derives
positions from the attention mask, so a prompt gets the same positions as in training.
With several processes each one generates its share and the results are gathered once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .collation import TokenizedRow, pad_prompts


@dataclass
class GenerationSettings:
    """Decoding. The defaults are the original code's: 2 beams, repetition penalty 2.5, no sampling."""

    max_new_tokens: int = 128
    num_beams: int = 2
    repetition_penalty: float = 2.5
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS, e.g. "." for COMET

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _stop_ids(tokenizer, settings: GenerationSettings) -> list[int]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return eos + list(settings.stop_token_ids)


def _generate_kwargs(tokenizer, settings: GenerationSettings) -> dict:
    kwargs = {"max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams,
              "repetition_penalty": settings.repetition_penalty, "do_sample": settings.do_sample,
              "eos_token_id": _stop_ids(tokenizer, settings) or None, "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    return kwargs


@torch.no_grad()
def generate_local(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                   device, desc: str = "generate", show_progress: bool = True) -> dict[int, str]:
    """Generate for ``rows`` on this process; returns ``{row.index: text}``."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    kwargs = _generate_kwargs(tokenizer, settings)
    was_training = model.training
    model.eval()
    ordered = sorted(rows, key=lambda r: len(r.prompt_ids))
    outputs: dict[int, str] = {}
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        ids, mask = pad_prompts(batch, tokenizer.pad_token_id, left=not encoder_decoder)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        new_tokens = out if encoder_decoder else out[:, ids.shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        outputs.update({row.index: text.strip() for row, text in zip(batch, texts)})
    model.train(was_training)
    return outputs


def generate(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
             accelerator=None, desc: str = "generate") -> list[str]:
    """Generate for every row, split across processes; the texts come back in row order."""
    if accelerator is None or accelerator.num_processes == 1:
        device = accelerator.device if accelerator is not None else next(model.parameters()).device
        local = generate_local(model, tokenizer, rows, settings, batch_size, device, desc)
    else:
        from accelerate.utils import gather_object

        mine = rows[accelerator.process_index::accelerator.num_processes]
        local_part = generate_local(accelerator.unwrap_model(model), tokenizer, mine, settings, batch_size,
                                    accelerator.device, desc, show_progress=accelerator.is_local_main_process)
        local = {}
        for part in gather_object([local_part]):
            local.update(part)
    return [local[row.index] for row in rows]


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
