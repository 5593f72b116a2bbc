"""Tokenisation and collation, with no padding between prompt and response.

Causal LMs see ``[prompt | response | pad ...]``: each row is packed to the left and padded on
the right only, so positions start at 0 on the first real token exactly as in ``generate()``, and
no pad sits between the prompt and its response (the original padded prompts on the left and
responses on the right, 2.4x the real tokens on HH-length data). Encoder-decoder LMs get the
prompt in the encoder and the response in the decoder, both right-padded.

Responses of causal LMs end with EOS, so the policy learns to stop.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import torch

from lolrl.engine.data import DataError, Record
from lolrl.utils.errors import ConfigError

logger = logging.getLogger(__name__)


# The tokenization rules' version, in the cache keys of everything computed from token ids: 2 = truncated
# prompts keep their special tokens and an empty prompt starts from BOS/EOS (issue 22); 3 = a chat prompt
# ending in an assistant message is continued (TRL's rule), conversational completions (issue 23).
TOKENIZATION = 3


@dataclass
class TokenizedRow:
    index: int  # position in the split's record list; keys every cache
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def render_prompt(tokenizer, prompt) -> str:
    """A chat prompt goes through the tokenizer's chat template, ready for the assistant turn."""
    if isinstance(prompt, str):
        return prompt
    return render_chat(tokenizer, prompt)[0]


def render_chat(tokenizer, prompt: list[dict], completion: list[dict] | None = None) -> tuple[str, str | None]:
    """Conversational ``prompt`` (and ``completion``) as text, as TRL renders a prompt-completion row
    (``trl.data_utils.apply_chat_template``): the prompt with the generation prompt (or, when it ends in an
    assistant message, continuing that message); with a completion, the whole conversation is rendered
    and split where it departs from the prompt's text (a template that renders the prompt alone
    differently, e.g. an extra token after the generation prompt, keeps their common prefix as the
    prompt), the rest being the completion's text, end-of-turn markers included."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("a prompt is a list of chat messages but the tokenizer has no chat template")
    continued = prompt[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=not continued,
                                         continue_final_message=continued)
    if completion is None:
        return text, None
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    shared = next((i for i, (a, b) in enumerate(zip(text, whole)) if a != b), min(len(text), len(whole)))
    return text[:shared], whole[shared:]


def check_prompts_renderable(tokenizer, records: list[Record], source: str) -> None:
    """Chat prompts need a chat template; say so before any model loads, naming the split's source (a file,
    a dataset) and the first such row by its id."""
    if any(r.is_chat for r in records) and not getattr(tokenizer, "chat_template", None):
        first = next(r for r in records if r.is_chat)
        raise DataError(source, None, "prompt", f"row {first.id!r} is a list of chat messages but the tokenizer has "
                                                "no chat template")


class Tokenizer:
    """Turns records into token ids with the truncation rules of the original code:
    prompts keep their last ``max_prompt_length`` tokens, responses their first ``max_resp_length``.

    A prompt is cut inside its content, so it keeps the tokenizer's special tokens (a Llama BOS, a
    T5 EOS), as the original's left-truncating tokenizer did; a chat template's leading BOS is kept
    too. An empty prompt of a tokenizer that adds no special token (GPT-2, DialoGPT) starts from BOS
    (else EOS), as GPT-2 generates unconditionally, so the first response token is scored too."""

    def __init__(self, tokenizer, encoder_decoder: bool, max_prompt_length: int = 512, max_resp_length: int = 128):
        self.tokenizer = tokenizer
        self.encoder_decoder = encoder_decoder
        self.max_prompt_length = max_prompt_length
        self.max_resp_length = max_resp_length

    def prompt_ids(self, prompt, text: str | None = None) -> list[int]:
        """``text``: the prompt already rendered (a conversational row's prompt, by :func:`render_chat`)."""
        tok = self.tokenizer
        text = render_prompt(tok, prompt) if text is None else text
        # A chat template already holds BOS and friends; plain text gets the model's usual specials.
        chat = isinstance(prompt, list)
        ids = tok(text, add_special_tokens=not chat)["input_ids"]
        if not ids:
            return [self.start_token()]
        if len(ids) <= self.max_prompt_length:
            return ids
        if chat:  # the template wrote its specials as text: keep a leading BOS
            head = 1 if tok.bos_token_id is not None and ids[0] == tok.bos_token_id else 0
            prefix, content, suffix = ids[:head], ids[head:], []
        else:
            prefix, content, suffix = self._split_specials(ids, tok(text, add_special_tokens=False)["input_ids"])
        room = self.max_prompt_length - len(prefix) - len(suffix)
        if room < 1:
            raise ConfigError(f"--max_prompt_length {self.max_prompt_length} leaves no room for a prompt's text "
                              f"beside the {len(prefix) + len(suffix)} special tokens the tokenizer adds")
        return prefix + content[-room:] + suffix

    @staticmethod
    def _split_specials(ids: list[int], content: list[int]) -> tuple[list[int], list[int], list[int]]:
        """``ids`` (with the tokenizer's special tokens) as (specials before, ``content``, specials after)."""
        n = len(content)
        for start in range(len(ids) - n + 1):
            if ids[start:start + n] == content:
                return ids[:start], content, ids[start + n:]
        raise ValueError("the tokenizer's ids with special tokens do not contain its ids without them: "
                         "cannot truncate a prompt while keeping its special tokens")

    def start_token(self) -> int:
        """The first token of an empty prompt: BOS, else EOS (GPT-2's unconditional start)."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ConfigError("a record has an empty prompt and the tokenizer has neither a BOS nor an EOS token "
                              "to start its response from: give every record a prompt")
        return start

    def response_ids(self, response: str, templated: bool = False) -> list[int]:
        """``templated``: a conversational completion rendered by the chat template, whose end-of-turn
        markers end it (no EOS is added, as TRL's SFT adds none to conversational rows)."""
        tok = self.tokenizer
        if templated and not self.encoder_decoder:
            return tok(response, add_special_tokens=False)["input_ids"][: self.max_resp_length]
        if self.encoder_decoder:
            ids = tok(text_target=response)["input_ids"]  # T5/BART add their own </s>
        else:
            ids = tok(response, add_special_tokens=False)["input_ids"]
        # End with EOS so the model learns to stop (the original relied on a literal EOS in the data).
        if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
            ids = ids + [tok.eos_token_id]
        return ids[: self.max_resp_length]

    def row(self, index: int, record: Record, response: str | None = None) -> TokenizedRow:
        """``record`` with its own completion, or with ``response`` (text) in its place."""
        if response is None and record.is_chat_completion:
            prompt_text, completion_text = render_chat(self.tokenizer, record.prompt, record.response)
            return TokenizedRow(index, self.prompt_ids(record.prompt, prompt_text),
                                self.response_ids(completion_text, templated=True))
        return TokenizedRow(index, self.prompt_ids(record.prompt),
                            self.response_ids(record.response if response is None else response))

    def __call__(self, records: list[Record], responses: list[str] | None = None) -> list[TokenizedRow]:
        if responses is None:
            return [self.row(i, r) for i, r in enumerate(records)]
        return [self.row(i, r, y) for i, (r, y) in enumerate(zip(records, responses))]


class Collator:
    """Turns a list of :class:`TokenizedRow` into model inputs, in one of two layouts.

    * padded (default): one row per sequence, ``[prompt | response | pad ...]``, right padding only;
    * packed (``pack=True`` or ``"positions"``, causal LMs whose attention honours it): every row back
      to back in one sequence with no padding at all, ``position_ids`` restarting at 0 for each row
      and no attention mask, so transformers builds a block-diagonal causal mask;
    * packed for a varlen kernel (``pack="varlen"``: flash attention, transformers' kernels): the same,
      plus the row boundaries as transformers' ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
      gives them: ``cu_seq_lens_q`` = ``cu_seq_lens_k`` (int32 ``[0, l1, l1+l2, ...]``) and
      ``max_length_q`` = ``max_length_k`` (the longest row; a 0-d tensor here, so that a batch moves
      to the device in one go, made a Python int at the model call).

    Keys: ``input_ids``, ``attention_mask`` (padded only), ``position_ids`` (packed only),
    ``target_ids`` / ``target_mask`` (the scored tokens, aligned so that ``logits[:, t]`` predicts
    ``target_ids[:, t]``), ``prompt_mask`` (causal: prompt positions), ``prompt_lengths``,
    ``response_lengths``, ``index``, and for encoder-decoder models ``decoder_input_ids`` /
    ``decoder_attention_mask``.
    """

    def __init__(self, pad_token_id: int, encoder_decoder: bool, decoder_start_token_id: int | None = None,
                 pack: bool = False):
        if pack and encoder_decoder:
            raise ValueError("packing is for decoder-only models")
        if pack not in PACKING_LAYOUTS:
            raise ValueError(f"pack: one of {PACKING_LAYOUTS}, not {pack!r}")
        self.pad = pad_token_id
        self.encoder_decoder = encoder_decoder
        self.decoder_start = decoder_start_token_id if decoder_start_token_id is not None else pad_token_id
        self.pack = pack

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def __call__(self, rows: list[TokenizedRow]) -> dict[str, torch.Tensor]:
        common = {"index": torch.tensor([r.index for r in rows], dtype=torch.long),
                  "prompt_lengths": torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long),
                  "response_lengths": torch.tensor([len(r.response_ids) for r in rows], dtype=torch.long)}
        if self.encoder_decoder:
            return self._seq2seq(rows) | common
        return (self._packed(rows) if self.pack else self._causal(rows)) | common

    @staticmethod
    def _target_flags(row: TokenizedRow) -> list[int]:
        # Shifted by one: target t is input token t+1, scored when it is a response token.
        return [0] * (len(row.prompt_ids) - 1) + [1] * len(row.response_ids)

    def _causal(self, rows: list[TokenizedRow]) -> dict[str, torch.Tensor]:
        sequences = [r.prompt_ids + r.response_ids for r in rows]
        input_ids = self._pad(sequences, self.pad)
        attention = self._pad([[1] * len(s) for s in sequences], 0)
        prompt_mask = self._pad([[1] * len(r.prompt_ids) + [0] * len(r.response_ids) for r in rows], 0)
        target_mask = self._pad([self._target_flags(r) for r in rows], 0)
        width = input_ids.shape[1] - 1
        return {"input_ids": input_ids, "attention_mask": attention, "prompt_mask": prompt_mask,
                "target_ids": input_ids[:, 1:], "target_mask": target_mask[:, :width]}

    def _packed(self, rows: list[TokenizedRow]) -> dict[str, torch.Tensor]:
        ids, positions, prompt_flags, target_flags = [], [], [], []
        for r in rows:
            ids += r.prompt_ids + r.response_ids
            positions += list(range(r.length))
            prompt_flags += [1] * len(r.prompt_ids) + [0] * len(r.response_ids)
            # a row's last token would "predict" the next row's first token: never scored
            target_flags += self._target_flags(r) + [0]
        input_ids = torch.tensor([ids], dtype=torch.long)
        batch = {"input_ids": input_ids, "position_ids": torch.tensor([positions], dtype=torch.long),
                 "prompt_mask": torch.tensor([prompt_flags], dtype=torch.long), "target_ids": input_ids[:, 1:],
                 "target_mask": torch.tensor([target_flags[:-1]], dtype=torch.long)}
        if self.pack == "varlen":
            batch |= varlen_kwargs([r.length for r in rows])
        return batch

    def _seq2seq(self, rows: list[TokenizedRow]) -> dict[str, torch.Tensor]:
        input_ids = self._pad([r.prompt_ids for r in rows], self.pad)
        attention = self._pad([[1] * len(r.prompt_ids) for r in rows], 0)
        targets = self._pad([r.response_ids for r in rows], self.pad)
        target_mask = self._pad([[1] * len(r.response_ids) for r in rows], 0)
        decoder_input_ids = self._pad([[self.decoder_start] + r.response_ids[:-1] for r in rows], self.pad)
        return {"input_ids": input_ids, "attention_mask": attention, "target_ids": targets,
                "target_mask": target_mask, "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": target_mask.clone()}


PACKING_LAYOUTS = (False, True, "positions", "varlen")  # True is "positions"


def varlen_kwargs(lengths: list[int]) -> dict[str, torch.Tensor]:
    """The row boundaries of a packed sequence, as varlen attention kernels take them."""
    cu_seq_lens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    longest = torch.tensor(max(lengths), dtype=torch.long)
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens.clone(),
            "max_length_q": longest, "max_length_k": longest.clone()}


def pad_prompts(rows: list[TokenizedRow], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask only; left padding for decoder-only generation, right otherwise."""
    width = max(len(r.prompt_ids) for r in rows)
    pads = [[pad_id] * (width - len(r.prompt_ids)) for r in rows]
    ids = [p + r.prompt_ids if left else r.prompt_ids + p for r, p in zip(rows, pads)]
    mask = [[0] * len(p) + [1] * len(r.prompt_ids) if left else [1] * len(r.prompt_ids) + [0] * len(p)
            for r, p in zip(rows, pads)]
    return torch.tensor(ids), torch.tensor(mask)


def padding_ratio(batch: dict[str, torch.Tensor]) -> float:
    """Tokens fed to the model / real tokens (1.0 for a packed batch)."""
    real = int((batch["prompt_lengths"] + batch["response_lengths"]).sum())
    fed = batch["input_ids"].numel() + (batch["decoder_input_ids"].numel() if "decoder_input_ids" in batch else 0)
    return fed / real


def length_grouped_batches(rows: list[TokenizedRow], batch_size: int, prompt_only: bool = False,
                           max_padding: float | None = None) -> list[list[TokenizedRow]]:
    """Batches of rows of similar length, in length order: the inference passes pad almost nothing.
    ``prompt_only``: by prompt length, for passes over the prompts alone (prompt states, generation).
    ``max_padding``: a batch also ends before a row that would make its padded tokens (rows x longest)
    exceed ``max_padding`` x its real tokens: few rows of scattered lengths would otherwise share one
    batch padded to the longest (16 HH prompts: 1.9x their tokens)."""
    lengths = [len(r.prompt_ids) if prompt_only else r.length for r in rows]
    return [[rows[i] for i in batch] for batch in padding_bounded_groups(lengths, batch_size, max_padding)]


def padding_bounded_groups(lengths: list[int], batch_size: int | None = None,
                           max_padding: float | None = None) -> list[list[int]]:
    """The indices of ``lengths`` in ascending length order (ties in index order), cut into groups of at most
    ``batch_size`` (None: no bound) that also end before an item that would make the group's padded size
    (items x longest) exceed ``max_padding`` x its real size (None: no bound)."""
    ordered = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = batch_size or max(len(ordered), 1)
    if max_padding is None:
        return [ordered[i:i + size] for i in range(0, len(ordered), size)]
    groups, real = [], 0
    for i in ordered:  # ascending: the new item is the group's longest
        padded = (len(groups[-1]) + 1) * lengths[i] if groups else 0
        if groups and len(groups[-1]) < size and padded <= max_padding * (real + lengths[i]):
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


def group_by_length(indices: list[int], lengths: list[int], batch_size: int, window: int = 50,
                    seed: int = 0) -> list[int]:
    """Reorder sampled indices so each batch holds rows of similar length, batches shuffled.

    Rows are sorted within windows of ``window`` batches (``window=1`` keeps the sampled order),
    then whole batches are shuffled, so the data order stays random at the batch level.
    """
    rng = random.Random(seed)
    span = batch_size * max(1, window)
    out: list[list[int]] = []
    for start in range(0, len(indices), span):
        chunk = sorted(indices[start:start + span], key=lambda i: lengths[i])
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return [i for batch in out for i in batch]
