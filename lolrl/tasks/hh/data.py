"""The Helpful-and-Harmless (HH-RLHF) data in PRO's format, as the original code reads and renders it.

A PRO-format file is JSON Lines: ``prefix`` (one dialogue per candidate; each dialogue a list of
turns beginning with ``<|prompter|>`` or ``<|assistant|>``, the last one the bare ``<|assistant|>``
slot), ``suffix`` (the candidate responses), ``reward`` (raw reward-model logits, one per suffix),
``sft_index`` and ``meta``. docs/hh.md describes the format and the original's rules this follows.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from lolrl.engine.data import REWARD_LIMIT, DataError, Record, json_lines

PROMPTER, ASSISTANT = "<|prompter|>", "<|assistant|>"
SYSTEM_PREFIX = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.\n")
RENDERINGS = ("llama", "anthropic", "chat")


def render_llama(turns: list[str]) -> str:
    """The original's LLaMA rendering: ``SYSTEM\\n### Human: q ### Assistant: a ... ### Assistant:``."""
    text = "".join(turns).replace(PROMPTER, " ### Human: ").replace(ASSISTANT, " ### Assistant: ")
    return SYSTEM_PREFIX + text.strip()


def render_anthropic(turns: list[str]) -> str:
    """The Anthropic format used to evaluate full PPO checkpoints: ``Human: ... Assistant:``."""
    return "".join(turns).replace(PROMPTER, "\nHuman: ").replace(ASSISTANT, "\nAssistant: ").strip()


def to_chat(turns: list[str]) -> list[dict[str, str]]:
    """Chat messages for the tokenizer's chat template (the final empty assistant slot is dropped)."""
    messages = []
    for turn in turns:
        role = "user" if turn.startswith(PROMPTER) else "assistant"
        content = turn[len(PROMPTER):] if role == "user" else turn[len(ASSISTANT):]
        if content or role == "user":
            messages.append({"role": role, "content": content})
    return messages


def render(turns: list[str], how: str = "llama"):
    if how == "llama":
        return render_llama(turns)
    if how == "anthropic":
        return render_anthropic(turns)
    if how == "chat":
        return to_chat(turns)
    raise ValueError(f"unknown HH rendering '{how}' (expected one of {', '.join(RENDERINGS)})")


# The next human turn in a generation: the original's "\n Human:", "\nHuman:", "\n### Human", and the
# llama rendering's own " ### Human" (a model that was not stopped at '###' continues the dialogue so).
NEXT_TURN = re.compile(r"\n ?Human:|(?:^|\s)### Human")
NEXT_TURN_ANTHROPIC = re.compile(NEXT_TURN.pattern + r"|\n ?Assistant:")


def stop_ids(tokenizer) -> list[int]:
    """The id of the token that begins the next ``### Human`` turn (835, ``▁###``, for LLaMA), so that
    generation stops there; ``[]`` when no single token is ``' ###'`` (then the post-processing alone
    cuts the text there).

    The token is found as the last id of ``encode("a ###")`` (checked to be one token after ``"a"``),
    not by ``encode(" ###")``: SentencePiece tokenizers (transformers 4.x's LLaMA tokenizer) add a
    ``▁`` of their own to the leading space, so that is two tokens, ``['▁', '▁###']``."""
    head = tokenizer.encode("a", add_special_tokens=False)
    ids = tokenizer.encode("a ###", add_special_tokens=False)
    return ids[-1:] if len(ids) == len(head) + 1 and ids[:len(head)] == head else []


def postprocess(text: str, anthropic: bool = False) -> str:
    """The original's clean-up of a generation: cut at the next human turn (:data:`NEXT_TURN`; also
    at the next ``Assistant:`` turn in the Anthropic format), drop a trailing ``###``. The one clean-up
    of validation, PPO rollouts and the test evaluation."""
    text = (NEXT_TURN_ANTHROPIC if anthropic else NEXT_TURN).split(text, maxsplit=1)[0]
    text = text.strip()
    if text.endswith("###"):
        text = text.replace("###", "").strip()
    return text


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class ProRow(dict):
    """A PRO-format record read from a file: the JSON object, plus where it was read (``source``, the
    file, and ``line``), so that a later check of the record (too few candidates, no preference pair)
    names the file and line as the reader's own checks do (:func:`row_location`)."""

    source: str | None = None
    line: int | None = None


def row_location(row: dict, name: str, index: int) -> tuple[str, int]:
    """``(file, line)`` of a record read by :func:`read_pro_file`; ``(name, index + 1)`` for a record
    built in memory (it has no file)."""
    if isinstance(row, ProRow) and row.source is not None:
        return row.source, row.line
    return name, index + 1


def read_pro_file(path: str | Path, allow_empty_suffix: bool = False) -> list[ProRow]:
    """Read and check a PRO-format JSON Lines file; errors name the file, line and field.

    An empty suffix is an error in a file trained on; the real HH dev and test files hold a few
    (hh_dev 1, harmless_base 4, helpful_base 4, helpful_online 3), so evaluation and validation read
    them with ``allow_empty_suffix=True`` (their prompts are what is used)."""
    rows = []
    for number, row in json_lines(path):
        _check_pro_row(row, str(path), number, allow_empty_suffix)
        row = ProRow(row)
        row.source, row.line = str(path), number
        rows.append(row)
    if not rows:
        raise DataError(str(path), None, None, "has no records")
    return rows


def _check_pro_row(row, source: str, line: int, allow_empty_suffix: bool = False) -> None:
    if not isinstance(row, dict):
        raise DataError(source, line, None, "expected a JSON object")
    for name in ("prefix", "suffix", "reward"):
        if not isinstance(row.get(name), list) or not row[name]:
            raise DataError(source, line, name, "expected a non-empty list")
    if len(row["suffix"]) != len(row["reward"]):
        raise DataError(source, line, "reward", f"{len(row['reward'])} rewards for {len(row['suffix'])} suffixes")
    turns = row["prefix"][0]
    if not isinstance(turns, list) or not turns or turns[-1] != ASSISTANT:
        raise DataError(source, line, "prefix", "expected turns ending with the bare '<|assistant|>' slot")
    if any(not isinstance(t, str) or not t.startswith((PROMPTER, ASSISTANT)) for t in turns):
        raise DataError(source, line, "prefix", "every turn must start with <|prompter|> or <|assistant|>")
    if any(not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or abs(r) > REWARD_LIMIT
           for r in row["reward"]):
        raise DataError(source, line, "reward", f"expected finite numbers within +-{REWARD_LIMIT:g}")
    for k, suffix in enumerate(row["suffix"]):
        if not isinstance(suffix, str):
            raise DataError(source, line, f"suffix[{k}]", f"expected a string, got {type(suffix).__name__}")
        if not suffix.strip() and not allow_empty_suffix:
            raise DataError(source, line, f"suffix[{k}]", "is empty (a response to train on)")
    sft_index = row.get("sft_index", 0)
    if not isinstance(sft_index, int) or isinstance(sft_index, bool):
        raise DataError(source, line, "sft_index", f"expected an integer, got {sft_index!r}")
    if not 0 <= sft_index < len(row["suffix"]):
        raise DataError(source, line, "sft_index", f"{sft_index} is out of range for {len(row['suffix'])} suffixes")


def pro_records(rows: list[dict], how: str = "llama", candidates: str = "sft", name: str = "hh",
                sigmoid_rewards: bool = True, n_candidates: int | None = None) -> list[Record]:
    """Records for the offline trainers: the ``sft_index`` response (``candidates="sft"``) or every
    suffix (``"all"``; the first ``n_candidates`` when given), each with its own reward through a
    sigmoid as the original does (raw logits with ``sigmoid_rewards=False``, as PRO uses them).
    The candidates of one prompt are consecutive, the ``sft_index`` one flagged ``meta["sft"]``."""
    records = []
    for i, row in enumerate(rows):
        prompt = render(row["prefix"][0], how)
        sft_index = row.get("sft_index", 0)
        if candidates == "sft":
            chosen = [sft_index]
        else:
            count = len(row["suffix"]) if n_candidates is None else n_candidates
            if not sft_index < count <= len(row["suffix"]):
                raise DataError(*row_location(row, name, i), "suffix", f"need {count} candidates including "
                                f"sft_index {sft_index}, the record has {len(row['suffix'])}")
            chosen = range(count)
        for k in chosen:
            # `turns` travels to reward functions as a column: the HH reward models read the raw dialogue.
            reward = sigmoid(row["reward"][k]) if sigmoid_rewards else float(row["reward"][k])
            records.append(Record(id=f"{name}-{i}-{k}", prompt=prompt, response=row["suffix"][k], reward=reward,
                                  meta={"candidate": k, "row": i, "sft": k == sft_index, "turns": row["prefix"][0]}))
    return records


def clean_training_rows(rows: list[dict]) -> tuple[list[dict], dict]:
    """The original's ``data_cleaning.py`` rule: drop a record whose first or second suffix ends
    with ':' (responses cut off after "here are some options:"); order is kept."""
    good = {i for i, r in enumerate(rows) if r["suffix"][0].endswith(":")}
    bad = {i for i, r in enumerate(rows) if len(r["suffix"]) > 1 and r["suffix"][1].endswith(":")}
    kept = [r for i, r in enumerate(rows) if i not in good | bad]
    report = {"records": len(rows), "good_suffix_ends_with_colon": len(good),
              "bad_suffix_ends_with_colon": len(bad), "dropped": len(good | bad), "kept": len(kept)}
    return kept, report
