"""Records: the (prompt, response, reward) rows every algorithm trains on.

A task directory holds ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``. One JSON object per line:

    {"id": "17", "prompt": "...", "response": "...", "reward": 0.7}
    {"id": "18", "prompt": [{"role": "user", "content": "hi"}], "response": "...",
     "reward_components": {"fluency": 0.9, "safe": 1.0, "final_reward": 1.9}}

The original code's field names are accepted too: ``prompt_or_input_text`` for the prompt,
``references`` for the response, ``meta_data`` for free-form metadata. Every row is validated
before any model is loaded; the first problem raises :class:`DataError`, whose message names the
file, the line and the field.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from lolrl.utils.errors import UserError

PROMPT_FIELDS = ("prompt", "prompt_or_input_text")
RESPONSE_FIELDS = ("response", "references")
META_FIELDS = ("meta", "meta_data")
SPLITS = ("train", "val", "test")


class DataError(UserError):
    """A malformed data file or row. ``str(err)`` is one line: ``file:line: field 'x': problem``."""

    def __init__(self, source: str, line: int | None, field_name: str | None, problem: str):
        self.source, self.line, self.field, self.problem = source, line, field_name, problem
        where = f"{source}:{line}" if line is not None else str(source)
        what = f" field '{field_name}':" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")


@dataclass
class Record:
    """One row. ``reward`` is the scalar R(x, y) trained on (``final_reward`` when components exist)."""

    id: str
    prompt: str | list[dict[str, str]]
    response: str
    reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def _first_present(row: dict, names: Sequence[str]) -> tuple[str | None, Any]:
    for name in names:
        if name in row:
            return name, row[name]
    return None, None


# |reward| above this is refused when read: its products with log-prob sums and importance weights
# would overflow float32 (max ~3.4e38) during training.
REWARD_LIMIT = 1e30


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _usable_reward(value: Any) -> bool:
    return _finite_number(value) and abs(value) <= REWARD_LIMIT


def check_reward_scale(values, ids, what: str) -> None:
    """Refuse rewards or advantages that are non-finite or beyond :data:`REWARD_LIMIT`, naming the row."""
    for value, rid in zip(values, ids):
        if not _usable_reward(float(value)):
            raise DataError(what, None, None, f"row id {rid!r}: value {float(value)!r} is not finite or beyond "
                                              f"+-{REWARD_LIMIT:g} (training on it would overflow)")


def _check_chat(messages: list, err) -> None:
    if not messages:
        raise err("is an empty message list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise err(f"message {i} must be an object with string 'role' and 'content'")


def parse_record(row: Any, source: str, line: int, require_reward: bool) -> Record:
    """Validate one decoded JSON row and turn it into a :class:`Record`."""
    if not isinstance(row, dict):
        raise DataError(source, line, None, f"expected a JSON object, got {type(row).__name__}")

    prompt_name, prompt = _first_present(row, PROMPT_FIELDS)
    if prompt_name is None:
        raise DataError(source, line, "prompt", f"missing (expected one of {', '.join(PROMPT_FIELDS)})")
    if isinstance(prompt, list):
        _check_chat(prompt, lambda p: DataError(source, line, prompt_name, p))
    elif not isinstance(prompt, str):
        raise DataError(source, line, prompt_name,
                        f"expected a string or a list of chat messages, got {type(prompt).__name__}")

    response_name, response = _first_present(row, RESPONSE_FIELDS)
    if response_name is None:
        raise DataError(source, line, "response", f"missing (expected one of {', '.join(RESPONSE_FIELDS)})")
    if isinstance(response, list) and len(response) == 1:  # the original stores references as [text]
        response = response[0]
    if not isinstance(response, str):
        raise DataError(source, line, response_name, f"expected a string, got {type(response).__name__}")
    if not response.strip():
        raise DataError(source, line, response_name, "is empty")

    components = row.get("reward_components", {})
    if components is None:
        components = {}
    if not isinstance(components, dict):
        raise DataError(source, line, "reward_components", "expected an object of name -> number")
    for name, value in components.items():
        if not _usable_reward(value):
            raise DataError(source, line, f"reward_components.{name}",
                            f"expected a finite number within +-{REWARD_LIMIT:g}, got {value!r}")

    reward = row.get("reward")
    if reward is not None and not _usable_reward(reward):
        raise DataError(source, line, "reward", f"expected a finite number within +-{REWARD_LIMIT:g}, got {reward!r}")
    if reward is None and "final_reward" in components:
        reward = components["final_reward"]
    if components and "final_reward" not in components and reward is None:
        raise DataError(source, line, "reward_components.final_reward", "missing (and no 'reward' field)")
    if require_reward and reward is None:
        raise DataError(source, line, "reward", "missing (give 'reward' or 'reward_components.final_reward')")

    rid = row.get("id", f"{Path(source).stem}-{line}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DataError(source, line, "id", f"expected a string or integer, got {rid!r}")

    _, meta = _first_present(row, META_FIELDS)
    known = {"id", "reward", "reward_components", *PROMPT_FIELDS, *RESPONSE_FIELDS, *META_FIELDS}
    extra = {k: v for k, v in row.items() if k not in known}
    meta = {**(meta if isinstance(meta, dict) else ({"meta": meta} if meta is not None else {})), **extra}
    return Record(id=str(rid), prompt=prompt, response=response,
                  reward=None if reward is None else float(reward),
                  reward_components={k: float(v) for k, v in components.items()}, meta=meta)


def _check_unique_ids(records: list[Record], lines: list[int], source: str) -> None:
    seen: dict[str, int] = {}
    for record, line in zip(records, lines):
        if record.id in seen:
            raise DataError(source, line, "id", f"duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = line


def parse_rows(rows: Iterable[tuple[int, Any]], source: str, require_reward: bool) -> list[Record]:
    """Validate ``(line_number, decoded_row)`` pairs from any source (a file or a ``datasets`` split)."""
    records, lines = [], []
    for line, row in rows:
        records.append(parse_record(row, source, line, require_reward))
        lines.append(line)
    if not records:
        raise DataError(source, None, None, "has no records")
    _check_unique_ids(records, lines, source)
    return records


def read_text(path: str | Path) -> str:
    """A user's text file, decoded: UTF-8 (with or without BOM) or UTF-16 (with a BOM, or without one
    when its NUL bytes show it); a missing file, a folder, a file we may not read, or another encoding
    raises :class:`DataError` naming the file (and, for a bad byte, the line)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(str(path), None, None, "is a directory, expected a file")
    if not path.exists():
        raise DataError(str(path), None, None, "file not found")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise DataError(str(path), None, None, "permission denied (cannot read this file)") from None
    except OSError as exc:
        raise DataError(str(path), None, None, f"cannot read this file ({exc.strerror or exc})") from None
    encoding = _encoding_of(data)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(str(path), line, None, f"not valid {encoding} text (byte 0x{data[exc.start]:02x}): "
                                               "save the file as UTF-8") from None


def _encoding_of(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    head = data[:200]
    if len(head) >= 4 and head.count(0) * 4 >= len(head):  # no BOM, but every other byte NUL: UTF-16
        return "utf-16-le" if head[1::2].count(0) > head[0::2].count(0) else "utf-16-be"
    return "utf-8"


def json_lines(path: str | Path) -> Iterable[tuple[int, Any]]:
    """``(line number, decoded value)`` of every non-blank line of a JSON Lines file; a missing file
    or a line that is not JSON raises :class:`DataError` naming the file (and line)."""
    path = Path(path)
    for number, text in enumerate(read_text(path).split("\n"), start=1):  # not splitlines: U+2028 is text
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), number, None, f"invalid JSON ({exc.msg} at column {exc.colno})") from None


def load_jsonl(path: str | Path, require_reward: bool = False) -> list[Record]:
    """Read and validate one JSON Lines file."""
    return parse_rows(json_lines(path), str(path), require_reward)


def records_from_dataset(dataset, source: str = "dataset", require_reward: bool = False) -> list[Record]:
    """Validate the rows of a Hugging Face ``datasets.Dataset`` (line = row index + 1)."""
    return parse_rows(((i + 1, dict(row)) for i, row in enumerate(dataset)), source, require_reward)


def load_jsonl_with_datasets(path: str | Path, require_reward: bool = False) -> list[Record]:
    """Read a JSON Lines file through ``datasets`` (its Arrow cache), then validate like :func:`load_jsonl`."""
    import datasets

    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, None, "file not found")
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as exc:  # Arrow could not build one schema for the file (or bad JSON)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(str(path), None, None, f"datasets cannot read this file ({first}); "
                                               "the default reader names the bad line") from None
    return records_from_dataset(dataset, str(path), require_reward)


def records_to_dataset(records: list[Record]):
    """The inverse view, for users who want ``datasets`` tooling (map, filter, push_to_hub)."""
    import datasets

    return datasets.Dataset.from_list([
        {"id": r.id, "prompt": r.prompt, "response": r.response, "reward": r.reward,
         "reward_components": r.reward_components or None} for r in records
    ])


@dataclass
class TaskData:
    train: list[Record]
    val: list[Record]
    test: list[Record] | None


def load_task_dir(input_dir: str | Path, split_files: dict[str, str] | None = None,
                  require_train_reward: bool = True, need_test: bool = True,
                  use_datasets: bool = False) -> TaskData:
    """Load and validate the splits of a task directory; ``split_files`` renames files per split."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DataError(str(input_dir), None, None, "input directory not found")
    names = {split: f"{split}.jsonl" for split in SPLITS}
    names.update(split_files or {})
    loader = load_jsonl_with_datasets if use_datasets else load_jsonl
    train = loader(input_dir / names["train"], require_reward=require_train_reward)
    val = loader(input_dir / names["val"])
    test = loader(input_dir / names["test"]) if need_test else None
    return TaskData(train=train, val=val, test=test)


def reward_matrix(records: list[Record]) -> dict[str, list[float]]:
    """Gold rewards of the given responses, per component plus ``final_reward`` (rows lacking one are skipped)."""
    names: list[str] = []
    for record in records:
        names += [n for n in record.reward_components if n not in names and n != "final_reward"]
    table = {name: [r.reward_components[name] for r in records if name in r.reward_components] for name in names}
    finals = [r.reward for r in records if r.reward is not None]
    if finals:
        table["final_reward"] = finals
    return table
