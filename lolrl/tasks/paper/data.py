"""Raw data of the paper's small-model tasks -> records: readers, filters, splits and prompts.

No model is loaded here except a tokenizer for the length filters. Each reader checks its raw
format and raises :class:`~lolrl.engine.data.DataError` naming the file, the line (CSV, TSV, JSON Lines)
or the JSON path (JSON files), and the field. The record layout is the original's
(``id``, ``prompt_or_input_text``, ``references``, ``meta_data``); the preprocessing scripts add
``reward_components``.

* Reddit (Kaggle "Reddit comment score"): ``comments_positive.csv`` / ``comments_negative.csv``.
* Wizard of Wikipedia (ParlAI JSON) and FaithDial (JSON, or the hub dataset).
* ATOMIC-10x (``ATOMIC10X.jsonl``) and ATOMIC-2020 (``test.tsv``) for COMET.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import random
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lolrl.engine.data import DataError, json_lines, read_text
from lolrl.tasks.paper.rewards import COMET_RELATION_PHRASES, EOS

RANDOM_SEED = 901

# ----------------------------------------------------------------------------- Reddit
REDDIT_FILES = {"positive": "comments_positive.csv", "negative": "comments_negative.csv"}
REDDIT_COLUMNS = ("id", "text", "parent_text", "score", "parent_score")
REDDIT_SAMPLE_SIZE = 102000
REDDIT_MAX_WORDS = 100
REDDIT_MAX_TOKENS = 300
REDDIT_HELD_OUT = 1000  # test = first 1000 filtered rows, val = next 1000, train = the rest
URL_TOKEN = "<URL>"
# http(s)://, optional www., a domain, a 1-6 character TLD, an optional path/query (the original's regex)
URL_RE = re.compile(r"https?://(?:www\.)?[-a-zA-Z0-9@:%._+~#=]{1,256}\.[a-zA-Z0-9()]{1,6}\b"
                    r"(?:[-a-zA-Z0-9@:;%_\\+.~#?&/=]*)")
# pandas.read_csv's default missing-value strings: the original read the CSVs with pandas and
# dropped rows whose text or parent_text was one of these
PANDAS_NA_VALUES = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                              "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def collapse_spaces(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def replace_urls(text: str) -> str:
    return URL_RE.sub(URL_TOKEN, text)


def _number(value: str, source: str, line: int, field: str) -> int | float:
    try:
        number = float(value)
    except ValueError:
        raise DataError(source, line, field, f"expected a number, got {value!r}") from None
    return int(number) if number.is_integer() else number


def read_reddit_csv(path: str | Path) -> list[dict]:
    """Rows of a Kaggle comment CSV with text and parent_text present (pandas' NA strings count as missing).

    Each row keeps ``_line``, the line it starts on. Scores must be numbers."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(source, None, None, "file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows = []
    with io.StringIO(read_text(path), newline="") as handle:  # decoded, or a one-line DataError
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise DataError(source, 1, None, "empty file (expected a header row)")
        missing = [c for c in REDDIT_COLUMNS if c not in header]
        if missing:
            raise DataError(source, 1, missing[0], f"missing column (the header has {', '.join(header)})")
        index = {c: header.index(c) for c in REDDIT_COLUMNS}
        line = reader.line_num + 1
        for values in reader:
            start, line = line, reader.line_num + 1
            if not values:
                continue
            if len(values) != len(header):
                raise DataError(source, start, None, f"expected {len(header)} columns, got {len(values)}")
            row = {c: values[i] for c, i in index.items()}
            if row["text"] in PANDAS_NA_VALUES or row["parent_text"] in PANDAS_NA_VALUES:
                continue
            row["score"] = _number(row["score"], source, start, "score")
            row["parent_score"] = _number(row["parent_score"], source, start, "parent_score")
            row["_line"] = start
            rows.append(row)
    return rows


def sample_rows(rows: list, sample_size: int, seed: int = RANDOM_SEED) -> list:
    """``DataFrame.sample(sample_size, random_state=seed)`` on a list: the same rows in the same order.

    (pandas draws ``RandomState(seed).permutation(len)[:n]``.) With fewer rows than ``sample_size``
    all rows are kept, shuffled the same way (pandas would raise)."""
    order = np.random.RandomState(seed).permutation(len(rows))[:min(sample_size, len(rows))]
    return [rows[i] for i in order]


def reddit_records(rows: list[dict], tokenizer, stats: dict | None = None) -> list[dict]:
    """Filter and format sampled rows, in order: collapse whitespace, drop > 100 words (either text),
    replace URLs by ``<URL>``, drop > 300 tokens for ``parent<eos>text<eos>``."""
    stats = stats if stats is not None else {}
    stats.update(too_long_words=0, too_long_tokens=0, urls=0)
    records = []
    for row in rows:
        parent, text = collapse_spaces(row["parent_text"]), collapse_spaces(row["text"])
        if len(parent.split()) > REDDIT_MAX_WORDS or len(text.split()) > REDDIT_MAX_WORDS:
            stats["too_long_words"] += 1
            continue
        stats["urls"] += bool(URL_RE.search(parent)) + bool(URL_RE.search(text))
        parent, text = replace_urls(parent), replace_urls(text)
        if len(tokenizer(parent + EOS + text + EOS)["input_ids"]) > REDDIT_MAX_TOKENS:
            stats["too_long_tokens"] += 1
            continue
        records.append({"id": row["id"], "prompt_or_input_text": parent + EOS, "references": text + EOS,
                        "meta_data": {"score": row["score"], "parent_score": row["parent_score"]}})
    return records


def split_reddit(records: list[dict], held_out: int = REDDIT_HELD_OUT) -> tuple[list, list, list]:
    """(test, val, train) = first ``held_out``, next ``held_out``, the rest."""
    return records[:held_out], records[held_out:2 * held_out], records[2 * held_out:]


# ----------------------------------------------------------------------------- WoW / FaithDial
WOW_FILES = {"train": "train.json", "val": "valid_topic_split.json"}
FAITHDIAL_FILES = {"train": ("train.json",), "val": ("valid.json", "validation.json"), "test": ("test.json",)}
HISTORY_MAX_TOKENS = 400
NO_PASSAGE = "no_passages_used"


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def _need(obj: Any, key: str, kind: type | tuple, source: str, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(source, None, f"{where}.{key}", "missing")
    if not isinstance(obj[key], kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(source, None, f"{where}.{key}", f"expected {names}, got {type(obj[key]).__name__}")
    return obj[key]


def extract_wow_examples(dialogues: Any, source: str = "wow") -> list[dict]:
    """Wizard turns with a checked sentence and a history, each ``{dialog_idx, response, history, knowledge}``.

    Walking each dialogue with a running history: an apprentice turn is appended; a wizard turn
    emits an example when its ``checked_sentence`` is non-empty, the history is non-empty and the
    knowledge is not ``no_passages_used``, and is then appended. Fix: a wizard turn with an empty
    ``checked_sentence`` emits nothing but still joins the history (the original dropped it from
    the history of later turns). Another speaker is a :class:`DataError`."""
    if not isinstance(dialogues, list):
        raise DataError(source, None, None, f"expected a list of dialogues, got {type(dialogues).__name__}")
    examples = []
    for d, dialogue in enumerate(dialogues):
        turns = _need(dialogue, "dialog", list, source, f"[{d}]")
        history: list[str] = []
        for t, turn in enumerate(turns):
            where = f"[{d}].dialog[{t}]"
            speaker = _need(turn, "speaker", str, source, where)
            text = _need(turn, "text", str, source, where)
            if "Apprentice" in speaker:
                history.append(text)
                continue
            if "Wizard" not in speaker:
                raise DataError(source, None, f"{where}.speaker",
                                f"expected a Wizard or Apprentice turn, got {speaker!r}")
            checked = _need(turn, "checked_sentence", dict, source, where)
            if checked:
                knowledge = next(iter(checked.values()))
                if not isinstance(knowledge, str):
                    raise DataError(source, None, f"{where}.checked_sentence", "expected a string value")
                if history and knowledge != NO_PASSAGE:
                    examples.append({"dialog_idx": len(examples), "response": text,
                                     "history": copy.deepcopy(history), "knowledge": knowledge})
            history.append(text)
    return examples


def read_wow_split(wow_dir: str | Path, split: str) -> list[dict]:
    path = Path(wow_dir) / WOW_FILES[split]
    return extract_wow_examples(_load_json(path), str(path))


def faithdial_examples(data: Any, source: str = "faithdial") -> list[dict]:
    """FaithDial rows ``{dialog_idx, response, history, knowledge}``; ``dialog_idx`` = position in the split.

    Accepts the release's JSON (a list of ``{"utterances": [...]}`` dialogues) or flat rows (the hub
    dataset's layout)."""
    if not isinstance(data, list):
        raise DataError(source, None, None, f"expected a JSON list, got {type(data).__name__}")
    flat: list[tuple[str, Any]] = []
    for d, item in enumerate(data):
        if isinstance(item, dict) and "utterances" in item:
            utterances = _need(item, "utterances", list, source, f"[{d}]")
            flat += [(f"[{d}].utterances[{u}]", row) for u, row in enumerate(utterances)]
        else:
            flat.append((f"[{d}]", item))
    examples = []
    for where, row in flat:
        history = _need(row, "history", list, source, where)
        if not all(isinstance(h, str) for h in history):
            raise DataError(source, None, f"{where}.history", "expected a list of strings")
        examples.append({"dialog_idx": len(examples), "response": _need(row, "response", str, source, where),
                         "history": list(history), "knowledge": _need(row, "knowledge", str, source, where)})
    return examples


def read_faithdial_split(faithdial_dir: str | Path | None, split: str) -> list[dict]:
    """A FaithDial split from local JSON files, or (``faithdial_dir=None``) from the hub dataset."""
    if faithdial_dir is None:
        import datasets

        name = {"train": "train", "val": "validation", "test": "test"}[split]
        rows = [dict(r) for r in datasets.load_dataset("McGill-NLP/FaithDial", split=name)]
        return faithdial_examples(rows, f"McGill-NLP/FaithDial[{name}]")
    for candidate in FAITHDIAL_FILES[split]:
        path = Path(faithdial_dir) / candidate
        if path.is_file():
            return faithdial_examples(_load_json(path), str(path))
    raise DataError(str(Path(faithdial_dir) / FAITHDIAL_FILES[split][0]), None, None, "file not found")


def compress_history(history: str, tokenizer, max_tokens: int = HISTORY_MAX_TOKENS) -> str:
    """Drop the oldest utterances (up to and including the first EOS) while the history has more than
    ``max_tokens`` tokens. Fix: a single utterance still longer keeps its last ``max_tokens`` tokens
    (the original raised IndexError)."""
    while len(tokenizer(history)["input_ids"]) > max_tokens:
        if EOS in history:
            history = history.split(EOS, 1)[1].strip()
        else:
            ids = tokenizer(history)["input_ids"][-max_tokens:]
            history = tokenizer.decode(ids).strip()
            break
    return history


def dialogue_prompt(knowledge: str, history: str) -> str:
    return f"Knowledge: {knowledge}{EOS}{history}{EOS}"


def dialogue_records(examples: list[dict], tokenizer, id_offset: int = 0) -> list[dict]:
    """Records with the original's prompt ``Knowledge: K<eos>u1<eos>u2<eos>`` and reference ``response<eos>``."""
    records = []
    for ex in examples:
        knowledge = ex["knowledge"].strip()
        history = compress_history(EOS.join(ex["history"]).strip(), tokenizer)
        records.append({"id": ex["dialog_idx"] + id_offset, "prompt_or_input_text": dialogue_prompt(knowledge, history),
                        "references": ex["response"].strip() + EOS,
                        "meta_data": {"knowledge": knowledge, "history": history}})
    return records


def dialogue_splits(variant: str, wow: dict[str, list[dict]], faithdial: dict[str, list[dict]], tokenizer,
                    seed: int = RANDOM_SEED) -> dict[str, list[dict]]:
    """Output file name -> records for ``wow``, ``faithdial`` or ``faithdial_wow``.

    wow: train / val from WoW (val = unseen-topic split), ``faithdial_test.jsonl`` = FaithDial test.
    faithdial: all three from FaithDial. faithdial_wow: WoW + FaithDial train shuffled together,
    WoW val followed by FaithDial val, FaithDial test. Fix: in faithdial_wow the FaithDial ids are
    offset by the number of WoW examples, so ids are unique (the original's collided)."""
    if variant == "wow":
        return {"train.jsonl": dialogue_records(wow["train"], tokenizer),
                "val.jsonl": dialogue_records(wow["val"], tokenizer),
                "faithdial_test.jsonl": dialogue_records(faithdial["test"], tokenizer)}
    if variant == "faithdial":
        return {name: dialogue_records(faithdial[split], tokenizer)
                for name, split in (("train.jsonl", "train"), ("val.jsonl", "val"), ("test.jsonl", "test"))}
    if variant == "faithdial_wow":
        out = {}
        for split in ("train", "val"):
            part = dialogue_records(wow[split], tokenizer)
            part += dialogue_records(faithdial[split], tokenizer, id_offset=len(wow[split]))
            if split == "train":
                random.Random(seed).shuffle(part)
            out[f"{split}.jsonl"] = part
        out["test.jsonl"] = dialogue_records(faithdial["test"], tokenizer)
        return out
    raise ValueError(f"unknown dialogue task {variant!r} (expected wow, faithdial or faithdial_wow)")


# ----------------------------------------------------------------------------- COMET
ATOMIC10X_FILE = "ATOMIC10X.jsonl"
ATOMIC2020_TEST_FILE = "test.tsv"
COMET_RELATIONS = tuple(COMET_RELATION_PHRASES)


def comet_prompt(head: str, relation: str) -> str:
    """The original's COMET-distill prompt (note the trailing space after ``[GEN]``)."""
    return f"<head> {head.strip()} </head> <relation> {relation} </relation> [GEN] "


def read_atomic10x(path: str | Path) -> dict[str, list[tuple[int, dict]]]:
    """``ATOMIC10X.jsonl`` rows grouped by their ``split`` (train / val / test), each with its line number."""
    source = str(path)
    splits: dict[str, list[tuple[int, dict]]] = {"train": [], "val": [], "test": []}
    for number, row in json_lines(path):
        if not isinstance(row, dict):
            raise DataError(source, number, None, "expected a JSON object")
        for key in ("head", "relation", "tail", "split"):
            if not isinstance(row.get(key), str):
                raise DataError(source, number, key, f"expected a string, got {row.get(key)!r}")
        value = row.get("p_valid_model")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise DataError(source, number, "p_valid_model", f"expected a finite number, got {value!r}")
        if row["split"] not in splits:
            raise DataError(source, number, "split", f"expected train, val or test, got {row['split']!r}")
        splits[row["split"]].append((number, row))
    return splits


def atomic10x_records(rows: Iterable[tuple[int, dict]]) -> tuple[list[dict], int]:
    """Records with the stored critic score as reward; rows with an empty tail are skipped (counted)."""
    records, skipped = [], 0
    for _, row in rows:
        if not row["tail"].strip():
            skipped += 1
            continue
        value = float(row["p_valid_model"])
        records.append({"id": len(records), "prompt_or_input_text": comet_prompt(row["head"], row["relation"]),
                        "references": row["tail"], "meta_data": {"original_dict": row},
                        "reward_components": {"p_valid_model": value, "final_reward": value}})
    return records, skipped


def read_atomic2020_test(path: str | Path) -> list[tuple[str, str, str]]:
    """(head, relation, tail) rows of ATOMIC-2020 ``test.tsv`` whose relation is one of the 7 COMET relations."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found")
    triples = []
    with io.StringIO(read_text(path), newline="") as handle:  # decoded, or a one-line DataError
        reader = csv.reader(handle, delimiter="\t")
        line = 1
        for values in reader:
            start, line = line, reader.line_num + 1
            if not values:
                continue
            if len(values) < 3:
                raise DataError(str(path), start, None, f"expected head, relation, tail columns, got {len(values)}")
            head, relation, tail = values[:3]
            if relation in COMET_RELATIONS and tail.strip():
                triples.append((head, relation, tail))
    return triples


def best_tail_records(triples: list[tuple[str, str, str]], scores: list[float]) -> list[dict]:
    """One record per unique (head, relation): the tail the critic scores highest (first one on ties),
    in order of first appearance; all tails are kept in ``meta_data.tails``."""
    best: dict[tuple[str, str], int] = {}
    tails: dict[tuple[str, str], list[str]] = {}
    for i, (head, relation, tail) in enumerate(triples):
        key = (head, relation)
        tails.setdefault(key, []).append(tail)
        if key not in best or scores[i] > scores[best[key]]:
            best[key] = i
    records = []
    for key, i in best.items():
        head, relation, tail = triples[i]
        value = float(scores[i])
        records.append({"id": len(records), "prompt_or_input_text": comet_prompt(head, relation), "references": tail,
                        "meta_data": {"original_dict": {"head": head, "relation": relation, "tail": tail,
                                                        "p_valid_model": value}, "tails": tails[key]},
                        "reward_components": {"p_valid_model": value, "final_reward": value}})
    return records
