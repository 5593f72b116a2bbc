"""METEOR as NLTK's ``meteor_score`` computes it (the original's ``datasets.load_metric("meteor")``).

For one hypothesis h and reference r (lower-cased tokens), words are aligned one-to-one in stages,
each on the words the previous stages left unmatched:

1. exact: equal words;
2. stem: equal Porter stems (NLTK's ``PorterStemmer``, no data needed);
3. synonym: the reference word is a WordNet lemma of the hypothesis word (only when the WordNet
   data is installed; like NLTK, this stage compares the *stems* left over by stage 2).

Within a stage NLTK's greedy order is kept: hypothesis words from last to first, each taking the
last still-unmatched reference word that qualifies. With m matches, c chunks (runs of matches
adjacent in both h and r, in hypothesis order) and NLTK's defaults alpha = 0.9, beta = 3, gamma = 0.5:

    P = m / |h|,  R = m / |r|,  Fmean = P R / (alpha P + (1 - alpha) R)
    penalty = gamma (c / m)^beta,  METEOR = (1 - penalty) Fmean,   and 0 when m = 0.

The corpus score is the mean over pairs. Texts are tokenised as ``nltk.word_tokenize`` does
(sentences, then the Treebank word tokenizer), except that sentences are split after ``. ! ?``
followed by whitespace instead of by the Punkt model, which is NLTK data.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Sequence

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Match = tuple[int, int]  # (hypothesis position, reference position)
Enumerated = list[tuple[int, str]]  # still-unmatched words with their positions


@dataclass(frozen=True)
class MeteorMatcher:
    """The matching stages in use: a stemmer, and a synonym lookup when WordNet is installed."""

    stem: Callable[[str], str]
    synonyms: Callable[[str], set[str]] | None = None

    @property
    def stages(self) -> str:
        """``exact+stem+wordnet`` or ``exact+stem``: what to report beside the scores."""
        return "exact+stem+wordnet" if self.synonyms is not None else "exact+stem"


def _wordnet_synonyms() -> Callable[[str], set[str]] | None:
    """``word -> single-word lemma names of its synsets`` if the WordNet data is installed, else None."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
    except LookupError:  # no data: NLTK never downloads it by itself
        return None

    @functools.lru_cache(maxsize=100_000)
    def synonyms(word: str) -> frozenset[str]:
        return frozenset(lemma.name() for synset in wordnet.synsets(word) for lemma in synset.lemmas()
                         if "_" not in lemma.name())

    return synonyms


@functools.lru_cache(maxsize=None)
def default_matcher() -> MeteorMatcher:
    """Porter stems (NLTK's default mode) and, when its data is installed, WordNet synonyms."""
    from nltk.stem.porter import PorterStemmer

    return MeteorMatcher(stem=functools.lru_cache(maxsize=100_000)(PorterStemmer().stem),
                         synonyms=_wordnet_synonyms())


@functools.lru_cache(maxsize=None)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def meteor_tokens(text: str) -> list[str]:
    """``nltk.word_tokenize`` with a regex sentence split (Punkt is NLTK data): Treebank tokens per sentence."""
    return list(_cached_tokens(text))


@functools.lru_cache(maxsize=200_000)  # the gold references come back at every validation
def _cached_tokens(text: str) -> tuple[str, ...]:
    tokenizer = _word_tokenizer()
    return tuple(token for sentence in _SENTENCE_END.split(text.strip()) if sentence
                 for token in tokenizer.tokenize(sentence))


def _match_stage(hypothesis: Enumerated, reference: Enumerated, qualifies: Callable[[str, str], bool]
                 ) -> tuple[list[Match], Enumerated, Enumerated]:
    """One stage of NLTK's greedy alignment: hypothesis words last to first, each taking the last
    unmatched reference word with ``qualifies(hyp_word, ref_word)``. Returns (matches, unmatched h, unmatched r)."""
    matches: list[Match] = []
    reference = list(reference)
    unmatched_hypothesis: Enumerated = []
    for h_pos, h_word in reversed(hypothesis):
        j = next((j for j in range(len(reference) - 1, -1, -1) if qualifies(h_word, reference[j][1])), None)
        if j is None:
            unmatched_hypothesis.append((h_pos, h_word))
        else:
            matches.append((h_pos, reference.pop(j)[0]))
    return matches, unmatched_hypothesis[::-1], reference


def align(hypothesis: Sequence[str], reference: Sequence[str], matcher: MeteorMatcher) -> list[Match]:
    """One-to-one word alignment (exact, then stem, then synonym), sorted by hypothesis position."""
    hyp: Enumerated = list(enumerate(w.lower() for w in hypothesis))
    ref: Enumerated = list(enumerate(w.lower() for w in reference))
    matches, hyp, ref = _match_stage(hyp, ref, str.__eq__)
    hyp = [(i, matcher.stem(w)) for i, w in hyp]
    ref = [(j, matcher.stem(w)) for j, w in ref]
    stem_matches, hyp, ref = _match_stage(hyp, ref, str.__eq__)
    matches += stem_matches
    if matcher.synonyms is not None:
        synonyms = matcher.synonyms
        matches += _match_stage(hyp, ref, lambda h, r: r == h or r in synonyms(h))[0]
    return sorted(matches)


def count_chunks(matches: Sequence[Match]) -> int:
    """Runs of matches adjacent in both texts: (i, j) then (i + 1, j + 1) continue a chunk."""
    if not matches:
        return 0
    return 1 + sum(1 for (i, j), (i2, j2) in zip(matches, matches[1:]) if (i2, j2) != (i + 1, j + 1))


def meteor_from_counts(matches: int, chunks: int, hypothesis_length: int, reference_length: int,
                       alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> float:
    """``(1 - gamma (c/m)^beta) * P R / (alpha P + (1 - alpha) R)``; 0 when nothing matched."""
    if matches == 0:
        return 0.0
    precision, recall = matches / hypothesis_length, matches / reference_length
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    return (1 - gamma * (chunks / matches) ** beta) * fmean


def sentence_meteor(hypothesis: Sequence[str], reference: Sequence[str], matcher: MeteorMatcher | None = None) -> float:
    """METEOR of one tokenised hypothesis against one tokenised reference."""
    matches = align(hypothesis, reference, matcher or default_matcher())
    return meteor_from_counts(len(matches), count_chunks(matches), len(hypothesis), len(reference))


def corpus_meteor(hypotheses: Sequence[str], references: Sequence[str], matcher: MeteorMatcher | None = None) -> float:
    """Mean sentence METEOR over aligned (hypothesis, reference) texts: the whole split, not one batch."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        return float("nan")
    matcher = matcher or default_matcher()
    return sum(sentence_meteor(meteor_tokens(h), meteor_tokens(r), matcher)
               for h, r in zip(hypotheses, references)) / len(hypotheses)
