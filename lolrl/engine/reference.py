"""The reference passes: pi_ref runs once over the data, never inside the training loop.

* :func:`reference_pass` gives, per training row, the reference log-prob of every response token
  and (when a value head is given) V(x) from the same forward's last-layer prompt states.
* :func:`prompt_states` gives the last-layer prompt states the value head is fit on.

With several processes each one handles its share of rows and the results are gathered once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lolrl.engine.collation import Collator, TokenizedRow, length_grouped_batches, pad_prompts
from lolrl.engine.modeling import last_hidden_states, response_logprobs
from lolrl.engine.value import pad_states


@dataclass
class ReferenceOutputs:
    logprobs: list[torch.Tensor]  # per row, one float per response token
    values: np.ndarray | None  # V(x) per row


def _share(rows: list, accelerator) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return rows
    return rows[accelerator.process_index::accelerator.num_processes]


def _gather(local: dict, accelerator) -> dict:
    if accelerator is None or accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    merged: dict = {}
    for part in gather_object([local]):
        merged.update(part)
    return merged


def _device(model, accelerator):
    return accelerator.device if accelerator is not None else next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def reference_pass(model, rows: list[TokenizedRow], collator: Collator, batch_size: int, value_head=None,
                   accelerator=None, desc: str = "reference pass", kernel: str = "chunked") -> ReferenceOutputs:
    """One eval-mode forward per row: response-token log-probs and, with ``value_head``, V(x).
    The caller sets the precision (the trainer: the training loss's autocast); the value head runs in fp32.
    ``kernel``: the output layer's log-prob kernel (:func:`lolrl.engine.modeling.choose_logprob_kernel`)."""
    was_training = model.training
    model.eval()
    device = _device(model, accelerator)
    if value_head is not None:
        value_head.to(device)
    local: dict[int, tuple[torch.Tensor, float | None]] = {}
    show = accelerator is None or accelerator.is_local_main_process
    for batch_rows in tqdm(length_grouped_batches(_share(rows, accelerator), batch_size), desc=desc,
                           disable=not show, leave=False):
        batch = _to(collator(batch_rows), device)
        logprobs, _, states = response_logprobs(model, batch, return_prompt_states=value_head is not None,
                                                kernel=kernel)
        values = None
        if value_head is not None:
            padded, state_mask = pad_states([s.float() for s in states])
            values = value_head(padded, state_mask.to(padded.device)).cpu()  # in fp32, whatever the autocast
        for i, row in enumerate(batch_rows):
            local[row.index] = (logprobs[i, : len(row.response_ids)].float().cpu(),
                                None if values is None else float(values[i]))
    model.train(was_training)
    merged = _gather(local, accelerator)
    ordered = [merged[row.index] for row in rows]
    values = np.array([v for _, v in ordered]) if value_head is not None else None
    return ReferenceOutputs(logprobs=[lp for lp, _ in ordered], values=values)


# The prompt states' batches hold at most this many padded tokens per real token. The reference pass groups
# every training row by length, so it pads little; a few dozen validation prompts in batches of ``batch_size``
# did not (the benchmark's 16 HH prompts, one batch: 2848 tokens for 1487 real ones; with the bound, 0.93 s
# against 1.65 s on one CPU thread).
PROMPT_PADDING = 1.25


@torch.no_grad()
def prompt_states(model, rows: list[TokenizedRow], pad_token_id: int, batch_size: int, accelerator=None,
                  desc: str = "prompt states") -> list[torch.Tensor]:
    """Last-layer states of each prompt ([L_i, H], on CPU): decoder-only output or encoder output,
    from the model without its output layer (no [tokens, vocab] logits are computed)."""
    was_training = model.training
    model.eval()
    device = _device(model, accelerator)
    local: dict[int, torch.Tensor] = {}
    show = accelerator is None or accelerator.is_local_main_process
    for batch_rows in tqdm(length_grouped_batches(_share(rows, accelerator), batch_size, prompt_only=True,
                                                  max_padding=PROMPT_PADDING), desc=desc,
                           disable=not show, leave=False):
        ids, mask = (t.to(device) for t in pad_prompts(batch_rows, pad_token_id))
        states = last_hidden_states(model, ids, mask)  # no output layer: no logits
        for i, row in enumerate(batch_rows):
            local[row.index] = states[i, : len(row.prompt_ids)].float().cpu()
    model.train(was_training)
    merged = _gather(local, accelerator)
    return [merged[row.index] for row in rows]
