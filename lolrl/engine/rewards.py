"""Reward functions: load them from a spec string and score (prompt, completion) pairs.

A reward follows TRL's reward-function convention: a callable
``f(prompts=..., completions=..., **columns) -> list[float]`` called with keyword arguments,
where every column is a list aligned with ``prompts`` (the extra fields of the data records).
A prompt (or completion) may be a string or a list of chat messages
``[{"role": ..., "content": ...}]``; callables receive them unchanged.

:class:`RewardFunction` is a weighted sum of such components. Calling it returns every
component's scores plus ``"final_reward"``, the weighted sum.

Spec grammar (:func:`load_reward`)::

    SPEC      := TERM ( "+" TERM )*            whitespace around "+" is allowed
    TERM      := [ WEIGHT "*" ] [ NAME "=" ] SOURCE
    WEIGHT    := a number parsed with float()  ("0.5", "-1", "2e-3")
    NAME      := [A-Za-z_][A-Za-z0-9_-]*       not "final_reward"; names must be unique
    SOURCE    := MODULE ":" FUNCTION           importable callable ("pkg.mod:fn", "pkg.mod:Cls.fn")
               | PATH ".py" ":" FUNCTION       callable defined in a python file
               | "hf:" MODEL [ "#" OPTIONS ]   sequence-classification model (local dir or hub id)
               | "text:" NAME                  a component from a well-kept package, scored on the completion
                                               (non_offensive, readability, sentiment: lolrl.engine.text_rewards)
    OPTIONS   := [ TRANSFORM ] ( "," KEY "=" VALUE )*
    TRANSFORM := [ "1-" ] ( "sigmoid" | "softmax" | "logit" ) [ "[" INDEX "]" ]
    KEY       := input       completion (default) | prompt_completion | pair
               | max_length  int, default 512 (tokens; longer inputs are truncated)
               | batch_size  int, rows per forward pass (default: the whole batch it is given)

A SPEC that ends in ``.json`` names a file
``{"components": [{"name": "...", "weight": 1.0, "source": "<SOURCE>"}, ...]}``
(``name`` and ``weight`` optional; relative paths in sources resolve against the file's folder
first). :meth:`RewardFunction.to_spec` writes the same layout.

Defaults: weight 1.0; name = the function name for callables, the last path component of the
model (non-identifier characters replaced by "_") for ``hf:``. The transform defaults to
``sigmoid[0]`` for 1-label models and ``softmax[1]`` for models with 2+ labels; an index left
out means ``[0]`` for sigmoid/logit and ``[1]`` for softmax. ``sigmoid[i]`` is
``sigmoid(logit_i)``, ``softmax[i]`` is ``softmax(logits)_i``, ``logit[i]`` is ``logit_i`` and
a leading ``1-`` gives one minus that.

Examples::

    load_reward("my_rewards:length_penalty")
    load_reward("0.5*fmt=rewards/format.py:check_format + 2*acc=my_rewards:accuracy")
    load_reward("hf:models/toxicity#1-softmax[1],input=completion,max_length=256")
    load_reward("hf:OpenAssistant/reward-model-deberta-v3-large-v2#logit,input=pair")
    load_reward("configs/reward.json")

User text is never passed to ``eval``/``exec``: files are imported with ``importlib.util`` and
numbers are parsed with ``float()``/``int()``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from lolrl.engine.text_rewards import text_reward
from lolrl.utils.errors import RewardSpecError, UserError

__all__ = [
    "RewardSpecError",
    "RewardOutputError",
    "RewardComponent",
    "RewardFunction",
    "load_reward",
    "reward_from_funcs",
    "render_text",
]

FINAL_KEY = "final_reward"
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_TRANSFORM_RE = re.compile(r"(1-)?([A-Za-z_]+)(?:\[(\d+)\])?")
_TRANSFORMS = ("sigmoid", "softmax", "logit")
_INPUT_MODES = ("completion", "prompt_completion", "pair")


class RewardOutputError(UserError):
    """A reward component returned something other than one finite number per row."""


def _first_line(exc: BaseException) -> str:
    """``Type: message`` on one line, so wrapped errors keep the one-line promise."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _spec_error(source: str, message: str) -> RewardSpecError:
    return RewardSpecError(f"reward spec {source!r}: {message}")


@dataclass
class RewardComponent:
    """One scored term: ``weight * fn(prompts=..., completions=..., **columns)``."""

    name: str
    weight: float
    fn: Callable[..., Sequence[float]]
    source: str  # the spec text it came from, quoted in error messages and cache keys
    version: str | None = None  # what else its scores depend on (a package's version), for cache keys


class RewardFunction:
    """Weighted sum of reward components; returns per-component scores and ``final_reward``."""

    def __init__(self, components: list[RewardComponent]):
        if not components:
            raise RewardSpecError("a reward needs at least one component")
        seen: set[str] = set()
        for comp in components:
            if comp.name == FINAL_KEY:
                raise _spec_error(comp.source, f"component name {FINAL_KEY!r} is reserved")
            if comp.name in seen:
                raise _spec_error(comp.source, f"duplicate component name {comp.name!r}")
            if not callable(comp.fn):
                raise _spec_error(comp.source, f"component {comp.name!r} is not callable")
            if not math.isfinite(float(comp.weight)):
                raise _spec_error(comp.source, f"weight {comp.weight!r} is not finite")
            seen.add(comp.name)
        self.components = list(components)

    @property
    def component_names(self) -> list[str]:
        return [c.name for c in self.components]

    @classmethod
    def from_callables(
        cls,
        callables: dict[str, Callable] | Callable,
        weights: dict[str, float] | None = None,
    ) -> "RewardFunction":
        """Build from python callables; a bare callable is named after its ``__name__``."""
        if callable(callables) and not isinstance(callables, dict):
            callables = {_callable_name(callables): callables}
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(callables))
        if unknown:
            raise RewardSpecError(f"weights given for unknown components {unknown}")
        return cls([
            RewardComponent(name, float(weights.get(name, 1.0)), fn, _callable_source(fn))
            for name, fn in callables.items()
        ])

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        batch_size: int = 32,
        show_progress: bool = True,
        desc: str = "reward",
        **columns: Sequence[Any],
    ) -> dict[str, list[float]]:
        """Score every row in batches; returns ``{name: scores, ..., "final_reward": sums}``."""
        n = _check_lengths(prompts, completions, columns)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scores: dict[str, list[float]] = {c.name: [] for c in self.components}
        with tqdm(total=n, desc=desc, disable=not show_progress, unit="row") as bar:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                batch_cols = {k: list(v[start:stop]) for k, v in columns.items()}
                for comp in self.components:
                    out = _call_component(comp, start, stop, batch_size, prompts=list(prompts[start:stop]),
                                          completions=list(completions[start:stop]), **batch_cols)
                    scores[comp.name].extend(_validate_output(comp, out, start, stop))
                bar.update(stop - start)
        scores[FINAL_KEY] = self._weighted_sum(scores, n)
        return scores

    def _weighted_sum(self, scores: dict[str, list[float]], n: int) -> list[float]:
        totals = [0.0] * n
        for comp in self.components:
            w = float(comp.weight)
            totals = [t + w * s for t, s in zip(totals, scores[comp.name])]
        return totals

    def to_spec(self) -> dict:
        """JSON-able description (same layout as a ``.json`` spec file)."""
        return {
            "components": [
                {"name": c.name, "weight": float(c.weight), "source": c.source,
                 **({"version": c.version} if c.version else {})}
                for c in self.components
            ]
        }

    def cache_key(self) -> dict:
        """What cached scores depend on: the spec and, for a Python component, the SHA-256 of its source
        file (the same spec text over an edited reward file is another reward)."""
        spec = self.to_spec()
        for entry, comp in zip(spec["components"], self.components):
            if not comp.source.startswith("hf:"):
                entry["code_sha256"] = _code_digest(comp.fn)
        return spec

    def __repr__(self) -> str:
        terms = " + ".join(f"{c.weight:g}*{c.name}={c.source}" for c in self.components)
        return f"RewardFunction({terms})"


def reward_from_funcs(reward_funcs, reward_weights: Sequence[float] | None = None) -> RewardFunction | None:
    """The reward of the trainer's ``reward_funcs=`` (TRL's GRPO convention): a callable, a reward spec
    string (:func:`load_reward`), a :class:`RewardFunction`, or a list of them, summed with
    ``reward_weights`` (one weight per element, default 1; a spec's own weights are multiplied by it).
    Components are named after their callables (a repeated name gets ``_2``, ``_3``, ...)."""
    if reward_funcs is None:
        if reward_weights is not None:
            raise RewardSpecError("reward_weights given without reward_funcs")
        return None
    if isinstance(reward_funcs, RewardFunction) and reward_weights is None:
        return reward_funcs
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise RewardSpecError("reward_funcs is an empty list")
    weights = [1.0] * len(funcs) if reward_weights is None else [float(w) for w in reward_weights]
    if len(weights) != len(funcs):
        raise RewardSpecError(f"{len(weights)} reward_weights for {len(funcs)} reward_funcs: give one weight each")
    components: list[RewardComponent] = []
    for i, (func, weight) in enumerate(zip(funcs, weights)):
        if isinstance(func, str):
            parts = load_reward(func).components
        elif isinstance(func, RewardFunction):
            parts = func.components
        elif callable(func):
            parts = [RewardComponent(_callable_name(func), 1.0, func, _callable_source(func))]
        else:
            raise RewardSpecError(f"reward_funcs[{i}] is a {type(func).__name__}: expected a callable, a reward spec "
                                  "string or a RewardFunction")
        for part in parts:
            name, n = part.name, 2
            while name in {c.name for c in components}:
                name, n = f"{part.name}_{n}", n + 1
            components.append(RewardComponent(name, weight * part.weight, part.fn, part.source, part.version))
    return RewardFunction(components)


# --------------------------------------------------------------------------- scoring helpers


def _check_lengths(prompts: Sequence, completions: Sequence, columns: dict) -> int:
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"got {n} prompts but {len(completions)} completions")
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} prompts")
    return n


# The keywords of a reward call: a data column of one of these names would take its place.
RESERVED_COLUMNS = ("prompts", "completions", "batch_size", "show_progress", "desc", "ids", "references")


def _call_component(comp: RewardComponent, start: int, stop: int, batch_size: int, **kwargs) -> Any:
    """Call a user's reward function; anything it raises becomes one line naming it and the batch."""
    try:
        return comp.fn(**kwargs)
    except UserError:
        raise
    except Exception as exc:  # user code: any failure is reported as the reward's, with where it happened
        raise RewardOutputError(f"reward component {comp.name!r} ({comp.source}) raised {_first_line(exc)} "
                                f"on batch {start // batch_size} (rows {start}..{stop - 1})") from None


def _validate_output(comp: RewardComponent, out: Any, start: int, stop: int) -> list[float]:
    """One finite float per row, or a RewardOutputError naming component, row and value."""
    where = f"reward component {comp.name!r} ({comp.source})"
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # numpy / torch
        out = out.tolist()
    if out is None or isinstance(out, (str, bytes, dict)) or not isinstance(out, Sequence):
        raise RewardOutputError(
            f"{where} returned {type(out).__name__} instead of a list of numbers "
            f"for rows {start}..{stop - 1}"
        )
    if len(out) != stop - start:
        raise RewardOutputError(
            f"{where} returned {len(out)} scores for a batch of {stop - start} "
            f"(rows {start}..{stop - 1})"
        )
    values = []
    for offset, value in enumerate(out):
        # bools are accepted as 0/1: "is the answer correct" rewards commonly return them
        if not isinstance(value, numbers.Real):
            raise RewardOutputError(
                f"{where} returned a non-number at row {start + offset}: {value!r}"
            )
        value = float(value)
        if not math.isfinite(value):
            raise RewardOutputError(
                f"{where} returned a non-finite score at row {start + offset}: {value!r}"
            )
        values.append(value)
    return values


def render_text(value: Any) -> str:
    """Text for a classifier: strings as-is, chat messages as ``role: content`` lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, (list, tuple)):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in value)
    raise TypeError(f"cannot render {type(value).__name__} as text (expected str or messages)")


# --------------------------------------------------------------------------- spec parsing


def load_reward(spec: str, device: str | torch.device | None = None) -> RewardFunction:
    """Build a :class:`RewardFunction` from a spec string or ``.json`` file (see module doc)."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec.endswith(".json"):
        return _load_json_spec(Path(spec), device)
    components = []
    for term in _split_terms(spec):
        weight, name, source = _parse_term(term)
        components.append(_build_component(source, name, weight, device, base_dir=None))
    return RewardFunction(components)


def _split_terms(spec: str) -> list[str]:
    """Split on "+", keeping exponents such as ``1e+3*...`` inside their term."""
    pieces = spec.split("+")
    terms: list[str] = []
    for piece in pieces:
        if terms and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)[eE]", terms[-1]):
            terms[-1] += "+" + piece
        else:
            terms.append(piece)
    stripped = [t.strip() for t in terms]
    if any(not t for t in stripped):
        raise RewardSpecError(f"reward spec {spec!r}: empty term (stray '+')")
    return stripped


def _parse_term(term: str) -> tuple[float, str | None, str]:
    """``[WEIGHT *] [NAME =] SOURCE`` -> (weight, name or None, source)."""
    original, weight = term, 1.0
    head, star, rest = term.partition("*")
    # a "*" counts as the weight separator only before any name or source text
    if star and not any(ch in head for ch in ":=/"):
        try:
            weight = float(head.strip())
        except ValueError:
            raise _spec_error(term, f"weight {head.strip()!r} is not a number") from None
        if not math.isfinite(weight):
            raise _spec_error(term, f"weight {head.strip()!r} is not finite")
        term = rest.strip()
    name = None
    head, eq, rest = term.partition("=")
    if eq and ":" not in head:
        name = head.strip()
        if not _NAME_RE.fullmatch(name):
            raise _spec_error(term, f"invalid component name {name!r} (use letters, digits, _ or -)")
        term = rest.strip()
    if not term:
        raise _spec_error(original, "missing source")
    return weight, name, term


def _build_component(
    source: str, name: str | None, weight: float, device, base_dir: Path | None
) -> RewardComponent:
    if source.startswith("hf:"):
        fn, default_name = _load_classifier(source, device, base_dir)
    elif source.startswith("text:"):
        fn = text_reward(source[len("text:"):].strip())
        return RewardComponent(name or fn.name, float(weight), fn, source, fn.version)
    else:
        fn = _load_callable(source, base_dir)
        default_name = _callable_name(fn)
    return RewardComponent(name or default_name, float(weight), fn, source)


def _load_json_spec(path: Path, device) -> RewardFunction:
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _spec_error(where, "file does not exist") from None
    except (OSError, ValueError) as exc:
        raise _spec_error(where, f"cannot read JSON ({_first_line(exc)})") from None
    entries = data.get("components") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise _spec_error(where, 'expected {"components": [{"source": ...}, ...]}')
    components = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise _spec_error(where, f"component {i} needs a string 'source'")
        try:
            weight = float(entry.get("weight", 1.0))
        except (TypeError, ValueError):
            raise _spec_error(where, f"component {i} weight {entry.get('weight')!r} is not a number") from None
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME_RE.fullmatch(name)):
            raise _spec_error(where, f"component {i} has invalid name {name!r}")
        components.append(_build_component(entry["source"].strip(), name, weight, device, path.parent))
    return RewardFunction(components)


# --------------------------------------------------------------------------- callables


def _callable_name(fn: Callable) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name)


def _code_digest(fn: Callable) -> str | None:
    """SHA-256 of the file that defines ``fn`` (None for built-ins and code without a file)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    module = sys.modules.get(getattr(fn, "__module__", None) or getattr(type(fn), "__module__", ""))
    path = getattr(module, "__file__", None)
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _callable_source(fn: Callable) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def _resolve_path(text: str, base_dir: Path | None) -> Path:
    """Relative paths in a JSON spec resolve against its folder first, then the cwd."""
    path = Path(text).expanduser()
    if base_dir is not None and not path.is_absolute() and (base_dir / path).exists():
        return base_dir / path
    return path


def _load_callable(source: str, base_dir: Path | None) -> Callable:
    target, colon, attr = source.rpartition(":")
    if not colon or not target or not attr:
        raise _spec_error(
            source, "expected 'module.path:function', 'file.py:function' or 'hf:MODEL'"
        )
    if target.endswith(".py") or "/" in target or os.sep in target:
        module, label = _import_file(source, _resolve_path(target, base_dir)), f"file {target!r}"
    else:
        module, label = _import_module(source, target), f"module {target!r}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _spec_error(source, f"{label} has no function {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _spec_error(source, f"{attr!r} in {label} is not callable ({type(obj).__name__})")
    return obj


def _import_module(source: str, target: str):
    try:
        return importlib.import_module(target)
    except Exception as exc:  # any failure while importing user code is a spec problem
        raise _spec_error(source, f"cannot import module {target!r} ({_first_line(exc)})") from None


def _import_file(source: str, path: Path):
    if not path.is_file():
        raise _spec_error(source, f"file {str(path)!r} does not exist")
    resolved = path.resolve()
    # a stable, unique module name per file so two files called rewards.py do not collide
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    mod_name = f"_lolrl_reward_{re.sub(r'[^A-Za-z0-9_]', '_', resolved.stem)}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise _spec_error(source, f"cannot load {str(path)!r} as a python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # registered first so dataclasses/pickle inside it work
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise _spec_error(source, f"cannot import file {str(path)!r} ({_first_line(exc)})") from None
    return module


# --------------------------------------------------------------------------- classifiers


@dataclass
class _ClassifierOptions:
    negate: bool = False
    transform: str | None = None  # None: chosen from num_labels once the model is loaded
    index: int | None = None
    input: str = "completion"
    max_length: int = 512
    batch_size: int | None = None


def _parse_options(source: str, text: str) -> _ClassifierOptions:
    opts = _ClassifierOptions()
    items = [item.strip() for item in text.split(",")] if text.strip() else []
    if items and "=" not in items[0]:
        _parse_transform(source, items.pop(0), opts)
    seen: set[str] = set()
    for item in items:
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq:
            raise _spec_error(source, f"option {item!r} should be KEY=VALUE (the transform goes first)")
        if key in seen:
            raise _spec_error(source, f"option {key!r} given twice")
        seen.add(key)
        _set_option(source, opts, key, value)
    return opts


def _parse_transform(source: str, text: str, opts: _ClassifierOptions) -> None:
    match = _TRANSFORM_RE.fullmatch(text)
    if not match:
        raise _spec_error(source, f"cannot parse transform {text!r} (e.g. 'softmax[1]', '1-sigmoid')")
    negate, kind, index = match.groups()
    if kind not in _TRANSFORMS:
        raise _spec_error(source, f"unknown transform {kind!r} (expected sigmoid, softmax or logit)")
    opts.negate = bool(negate)
    opts.transform = kind
    opts.index = int(index) if index is not None else None


def _set_option(source: str, opts: _ClassifierOptions, key: str, value: str) -> None:
    if key == "input":
        if value not in _INPUT_MODES:
            raise _spec_error(source, f"input {value!r} should be one of {', '.join(_INPUT_MODES)}")
        opts.input = value
    elif key in ("max_length", "batch_size"):
        try:
            number = int(value)
        except ValueError:
            raise _spec_error(source, f"{key} {value!r} is not an integer") from None
        if number < 1:
            raise _spec_error(source, f"{key} must be >= 1, got {number}")
        setattr(opts, key, number)
    else:
        raise _spec_error(source, f"unknown option {key!r} (expected input, max_length or batch_size)")


def _finish_transform(source: str, opts: _ClassifierOptions, num_labels: int) -> None:
    """Fill in defaults and check the index against the model's number of labels."""
    if opts.transform is None:
        opts.transform = "sigmoid" if num_labels == 1 else "softmax"
    if opts.index is None:
        opts.index = 1 if opts.transform == "softmax" and num_labels > 1 else 0
    if opts.index >= num_labels:
        raise _spec_error(
            source, f"{opts.transform}[{opts.index}] is out of range: the model has {num_labels} label(s)"
        )
    if opts.transform == "softmax" and num_labels == 1:
        raise _spec_error(source, "softmax over a 1-label model is always 1.0; use sigmoid or logit")


def _load_classifier(source: str, device, base_dir: Path | None) -> tuple[Callable, str]:
    model_text, _, option_text = source[len("hf:"):].partition("#")
    model_text = model_text.strip()
    if not model_text:
        raise _spec_error(source, "missing model path or hub id after 'hf:'")
    opts = _parse_options(source, option_text)
    model_path = _resolve_path(model_text, base_dir)
    if model_path.exists():
        location = str(model_path)
    elif _hub_offline():
        # fail here with a plain message instead of transformers' long hub error
        raise _spec_error(
            source, f"model path {model_text!r} does not exist and HF_HUB_OFFLINE is set"
        )
    else:
        location = model_text  # a hub id
    tokenizer, model = _load_hf(source, location, device)
    _finish_transform(source, opts, int(model.config.num_labels))
    last_part = Path(model_text.rstrip("/\\")).name
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", last_part) or "classifier"
    return _ClassifierReward(tokenizer, model, opts), name


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _load_hf(source: str, location: str, device):
    """Tokenizer + classifier in eval mode, with a pad token GPT-2-style models can use."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForSequenceClassification.from_pretrained(location)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise _spec_error(source, f"cannot load classifier {location!r} ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise _spec_error(source, "tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        # decoder classifiers pool the last token that is not pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    # right padding: decoder positions then match the unpadded row, and the pooled
    # "rightmost non-pad token" is the row's last real token
    tokenizer.padding_side = "right"
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    model.eval()
    return tokenizer, model


class _ClassifierReward:
    """Reward callable wrapping a sequence classifier; one float per (prompt, completion)."""

    def __init__(self, tokenizer, model, opts: _ClassifierOptions):
        self.tokenizer = tokenizer
        self.model = model
        self.opts = opts
        self.__name__ = "classifier"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
        prompts = [render_text(p) for p in prompts]
        completions = [render_text(c) for c in completions]
        # longest first, so each forward pass pads rows of similar length
        order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
        step = self.opts.batch_size or max(len(order), 1)
        results: list[float] = [0.0] * len(order)
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            scores = self._score([prompts[i] for i in chunk], [completions[i] for i in chunk])
            for i, score in zip(chunk, scores):
                results[i] = score
        return results

    @torch.inference_mode()
    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        if self.opts.input == "pair":
            enc = self.tokenizer(prompts, completions, truncation=True, padding=True,
                                 max_length=self.opts.max_length, return_tensors="pt")
        else:
            texts = completions if self.opts.input == "completion" else [
                f"{p} {c}" for p, c in zip(prompts, completions)
            ]
            enc = self.tokenizer(texts, truncation=True, padding=True,
                                 max_length=self.opts.max_length, return_tensors="pt")
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        logits = self.model(**enc).logits.float()
        return self._transform(logits).tolist()

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        kind, index = self.opts.transform, self.opts.index
        if kind == "softmax":
            values = torch.softmax(logits, dim=-1)[:, index]
        elif kind == "sigmoid":
            values = torch.sigmoid(logits[:, index])
        else:
            values = logits[:, index]
        return 1.0 - values if self.opts.negate else values
