"""Records: the (prompt, completion, reward) rows every algorithm trains on.

Rows come in TRL's prompt-completion form, from a task directory (``train.jsonl``, ``val.jsonl``,
``test.jsonl``: one JSON object per line) or from 🤗 ``datasets.Dataset`` objects
(:meth:`TaskData.from_datasets`, the Python API's ``train_dataset=`` / ``eval_dataset=``):

    {"id": "17", "prompt": "...", "completion": "...", "reward": 0.7}
    {"id": "18", "prompt": [{"role": "user", "content": "hi"}],
     "completion": [{"role": "assistant", "content": "hello"}],
     "reward_components": {"fluency": 0.9, "safe": 1.0, "final_reward": 1.9}}

``response`` is an alias of ``completion`` (one of them per row, not both). A conversational
prompt (and completion) is a list of ``{"role", "content"}`` messages, rendered with the tokenizer's
chat template as TRL renders them (:func:`lolrl.engine.collation.render_chat`). Any other column
reaches the reward functions as a column (TRL's ``f(prompts, completions, **columns)``). The
original code's field names are accepted too: ``prompt_or_input_text`` for the prompt,
``references`` for the completion, ``meta_data`` for free-form metadata. Every row is validated
before any model is loaded, by one function (:func:`parse_record`) whatever its source; the first
problem raises :class:`DataError`, whose one-line message names the file, the line and the field
(``train.jsonl:3: field 'reward': ...``) or the dataset, the row index and the column
(``train_dataset row 2: column 'completion': ...``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lolrl.utils.errors import UserError

PROMPT_FIELDS = ("prompt", "prompt_or_input_text")
RESPONSE_FIELDS = ("completion", "response", "references")
META_FIELDS = ("meta", "meta_data")
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("validation", "val", "eval")  # the validation split's names in a DatasetDict


class DataError(UserError):
    """A malformed data file or row. ``str(err)`` is one line: ``file:line: field 'x': problem``, or for
    a ``datasets.Dataset`` (``unit="row"``, ``line`` = the 0-based row index, as ``dataset[i]``)
    ``name row i: column 'x': problem``."""

    def __init__(self, source: str, line: int | None, field_name: str | None, problem: str, unit: str = "line"):
        self.source, self.line, self.field, self.problem, self.unit = source, line, field_name, problem, unit
        rows = unit == "row"
        where = str(source) if line is None else f"{source} row {line}" if rows else f"{source}:{line}"
        what = f" {'column' if rows else 'field'} '{field_name}':" if field_name else ""
        super().__init__(f"{where}:{what} {problem}")


@dataclass
class Record:
    """One row. ``reward`` is the scalar R(x, y) trained on (``final_reward`` when components exist)."""

    id: str
    prompt: str | list[dict[str, str]]
    response: str | list[dict[str, str]]  # the completion
    reward: float | None = None
    reward_components: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)

    @property
    def is_chat_completion(self) -> bool:
        """The completion is a list of messages (TRL's conversational form; its prompt is one too)."""
        return isinstance(self.response, list)


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


def _one_of(row: dict, names: Sequence[str], err) -> tuple[str | None, Any]:
    """The one field of ``names`` present in ``row`` (aliases of one another); two of them are refused."""
    present = [name for name in names if name in row]
    if len(present) > 1:
        raise err(present[1], f"both '{present[0]}' and '{present[1]}' given (aliases of one field): keep one")
    return (present[0], row[present[0]]) if present else (None, None)


def parse_record(row: Any, source: str, line: int, require_reward: bool, unit: str = "line") -> Record:
    """Validate one decoded row (a JSON line, ``unit="line"``, or a dataset row, ``unit="row"``: then a
    ``None`` value is a value Arrow's table lacks, the same as a missing field) into a :class:`Record`."""
    def err(field_name: str | None, problem: str) -> DataError:
        return DataError(source, line, field_name, problem, unit)

    if not isinstance(row, dict):
        raise err(None, f"expected a JSON object, got {type(row).__name__}")
    if unit == "row":
        row = {k: v for k, v in row.items() if v is not None}
        if isinstance(row.get("reward_components"), dict):  # a struct column: a name some rows lack is None
            row["reward_components"] = {k: v for k, v in row["reward_components"].items() if v is not None}

    prompt_name, prompt = _one_of(row, PROMPT_FIELDS, err)
    if prompt_name is None:
        raise err("prompt", f"missing (expected one of {', '.join(PROMPT_FIELDS)})")
    if isinstance(prompt, list):
        _check_chat(prompt, lambda p: err(prompt_name, p))
    elif not isinstance(prompt, str):
        raise err(prompt_name, f"expected a string or a list of chat messages, got {type(prompt).__name__}")

    response_name, response = _one_of(row, RESPONSE_FIELDS, err)
    if response_name is None:
        raise err("completion" if unit == "row" else "response",
                  f"missing (expected one of {', '.join(RESPONSE_FIELDS)})")
    if isinstance(response, list) and len(response) == 1 and isinstance(response[0], str):
        response = response[0]  # the original stores references as [text]
    if isinstance(response, list):  # conversational: messages continuing a conversational prompt
        _check_chat(response, lambda p: err(response_name, p))
        if not isinstance(prompt, list):
            raise err(response_name, "is a list of chat messages but the prompt is not (a conversational "
                                     "completion continues a conversational prompt)")
        if not "".join(m["content"] for m in response).strip():
            raise err(response_name, "is empty")
    elif not isinstance(response, str):
        raise err(response_name, f"expected a string or a list of chat messages, got {type(response).__name__}")
    elif not response.strip():
        raise err(response_name, "is empty")

    components = row.get("reward_components", {})
    if components is None:
        components = {}
    if not isinstance(components, dict):
        raise err("reward_components", "expected an object of name -> number")
    for name, value in components.items():
        if not _usable_reward(value):
            raise err(f"reward_components.{name}", f"expected a finite number within +-{REWARD_LIMIT:g}, got {value!r}")

    reward = row.get("reward")
    if reward is not None and not _usable_reward(reward):
        raise err("reward", f"expected a finite number within +-{REWARD_LIMIT:g}, got {reward!r}")
    if reward is None and "final_reward" in components:
        reward = components["final_reward"]
    if components and "final_reward" not in components and reward is None:
        raise err("reward_components.final_reward", "missing (and no 'reward' field)")
    if require_reward and reward is None:
        raise err("reward", "missing (give 'reward' or 'reward_components.final_reward')")

    rid = row.get("id", f"{Path(source).stem}-{line}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise err("id", f"expected a string or integer, got {rid!r}")

    _, meta = _first_present(row, META_FIELDS)
    known = {"id", "reward", "reward_components", *PROMPT_FIELDS, *RESPONSE_FIELDS, *META_FIELDS}
    extra = {k: v for k, v in row.items() if k not in known}
    meta = {**(meta if isinstance(meta, dict) else ({"meta": meta} if meta is not None else {})), **extra}
    return Record(id=str(rid), prompt=prompt, response=response,
                  reward=None if reward is None else float(reward),
                  reward_components={k: float(v) for k, v in components.items()}, meta=meta)


def _check_unique_ids(records: list[Record], lines: list[int], source: str, unit: str) -> None:
    seen: dict[str, int] = {}
    for record, line in zip(records, lines):
        if record.id in seen:
            raise DataError(source, line, "id", f"duplicate id {record.id!r} (first on {unit} {seen[record.id]})",
                            unit)
        seen[record.id] = line


def parse_rows(rows: Iterable[tuple[int, Any]], source: str, require_reward: bool, unit: str = "line") -> list[Record]:
    """Validate ``(line_number, decoded_row)`` pairs from any source (a file, or a ``datasets`` split with
    ``unit="row"`` and 0-based row indices)."""
    records, lines = [], []
    for line, row in rows:
        records.append(parse_record(row, source, line, require_reward, unit))
        lines.append(line)
    if not records:
        raise DataError(source, None, None, "has no records")
    _check_unique_ids(records, lines, source, unit)
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


def dataset_rows(dataset, batch_size: int = 1024, first: int = 0) -> Iterable[tuple[int, dict]]:
    """``(first + row index, row)`` of a ``datasets.Dataset``, read a batch of columns at a time (Arrow's
    fast path; one row's dict lives only while it is validated)."""
    if not hasattr(dataset, "iter") or not hasattr(dataset, "column_names"):
        raise DataError(str(type(dataset).__name__), None, None,
                        "expected a datasets.Dataset (e.g. Dataset.from_list(rows) or load_dataset(...)[split])")
    index = first
    for batch in dataset.iter(batch_size=batch_size):
        names = list(batch)
        for values in zip(*(batch[name] for name in names)):
            yield index, dict(zip(names, values))
            index += 1


def records_from_dataset(dataset, source: str = "dataset", require_reward: bool = False,
                         unit: str = "row") -> list[Record]:
    """Validate the rows of a 🤗 ``datasets.Dataset`` with the checks of a JSON Lines file; errors name
    ``source``, the row index (as ``dataset[i]``) and the column. ``unit="line"``: a JSON Lines file read
    through ``datasets``, errors naming its line (row index + 1)."""
    return parse_rows(dataset_rows(dataset, first=1 if unit == "line" else 0), source, require_reward, unit)


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
    return records_from_dataset(dataset, str(path), require_reward, unit="line")


def records_to_dataset(records: list[Record]):
    """The inverse view, for users who want ``datasets`` tooling (map, filter, push_to_hub)."""
    import datasets

    return datasets.Dataset.from_list([
        {"id": r.id, "prompt": r.prompt, "completion": r.response, "reward": r.reward,
         "reward_components": r.reward_components or None} for r in records
    ])


@dataclass
class TaskData:
    train: list[Record]
    val: list[Record]
    test: list[Record] | None
    # where each split came from, for messages: {"train": "DIR/train.jsonl" or "train_dataset", ...}
    sources: dict[str, str] = field(default_factory=dict)

    def source(self, split: str) -> str:
        return self.sources.get(split, split)

    @classmethod
    def from_datasets(cls, train=None, eval=None, test=None, require_train_reward: bool = True) -> "TaskData":
        """Validated records from 🤗 ``datasets.Dataset`` splits in TRL's prompt-completion form (the
        rows of a task directory's files, as columns). ``eval`` is the validation split (pi_ref's
        generations for V(x), model selection); ``train`` may be left out to only evaluate. A bad row
        raises :class:`DataError` naming the split, the row index and the column, e.g.
        ``train_dataset row 2: column 'reward': expected a finite number ...``."""
        if isinstance(eval, Mapping):  # a DatasetDict: its validation split, and its test split unless given
            name = next((n for n in EVAL_SPLITS if n in eval), None)
            if name is None:
                raise DataError("eval_dataset", None, None, f"has splits {', '.join(eval)}: expected one named "
                                                            f"{' or '.join(EVAL_SPLITS)}")
            test = eval.get("test") if test is None else test
            eval = eval[name]
        if eval is None:
            raise DataError("eval_dataset", None, None, "missing: the validation split is needed (for the value "
                                                        "estimate and to choose the best model)")
        return cls(train=[] if train is None else records_from_dataset(train, "train_dataset", require_train_reward),
                   val=records_from_dataset(eval, "eval_dataset"),
                   test=records_from_dataset(test, "test_dataset") if test is not None else None,
                   sources={"train": "train_dataset", "val": "eval_dataset", "test": "test_dataset"})


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
    sources = {split: str(input_dir / name) for split, name in names.items()}
    return TaskData(train=train, val=val, test=test, sources=sources)


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
