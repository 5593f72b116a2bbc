"""Batched generation with the KV cache, prompts sorted by length, each row stopping at its own EOS.

Causal prompts are left-padded here (generation appends on the right); ``generate`` derives
positions from the attention mask, so a prompt gets the same positions as in training.
With several processes each one generates its share and the results are gathered once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from lolrl.engine.collation import TokenizedRow, length_grouped_batches, pad_prompts


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


@torch.no_grad()
def generate_local(model, tokenizer, rows: list[TokenizedRow], settings: GenerationSettings, batch_size: int,
                   device, desc: str = "generate", show_progress: bool = True,
                   synced_batches: int | None = None) -> dict[int, str]:
    """Generate for ``rows`` on this process; returns ``{row.index: text}``. With ``synced_batches``
    (sharded weights) this process runs exactly that many ``generate`` calls with ``synced_gpus``,
    dummy ones where it has no rows left, so that no process waits for a collective alone."""
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    kwargs = _generate_kwargs(tokenizer, settings)
    was_training = model.training
    model.eval()
    outputs: dict[int, str] = {}
    batches = length_grouped_batches(rows, batch_size, prompt_only=True)
    total = len(batches)
    if synced_batches is not None:
        kwargs["synced_gpus"] = True
        total = synced_batches
    for k in tqdm(range(total), desc=desc, disable=not show_progress, leave=False):
        if k < len(batches):
            ids, mask = pad_prompts(batches[k], tokenizer.pad_token_id, left=not encoder_decoder)
        else:  # a batch this process does not need, only to keep it in step (output discarded)
            ids = torch.full((1, 1), tokenizer.pad_token_id)
            mask = torch.ones_like(ids)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        if k < len(batches):
            new_tokens = out if encoder_decoder else out[:, ids.shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            outputs.update({row.index: text.strip() for row, text in zip(batches[k], texts)})
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
        synced = batches_per_process(len(rows), accelerator.num_processes, batch_size) \
            if sharded_parameters(accelerator) else None
        local_part = generate_local(accelerator.unwrap_model(model), tokenizer, mine, settings, batch_size,
                                    accelerator.device, desc, show_progress=accelerator.is_local_main_process,
                                    synced_batches=synced)
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
