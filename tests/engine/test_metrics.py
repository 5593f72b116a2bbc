"""Coverage/density (dialogue tasks) and METEOR: hand-computed values, NLTK agreement, and their
place in the trainer's tables and the aggregator."""
import csv
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder: paper_tiny

from lolrl.engine import meteor
from lolrl.engine.reports import (
    coverage_and_density,
    extractive_fragment_lengths,
    knowledge_overlap_summary,
    summarize_generations,
)
from lolrl.tasks.paper.data import dialogue_prompt
from lolrl.tasks.paper.rewards import EOS, dialogue_knowledge


# --------------------------------------------------------------------------- coverage and density
def test_fragments_and_scores_by_hand():
    knowledge = "Paris is the capital of France ."
    response = "I think Paris is the capital of France ."  # 9 tokens, one 7-token fragment
    assert extractive_fragment_lengths(knowledge.split(), response.split()) == [7]
    assert coverage_and_density(knowledge, response) == (pytest.approx(7 / 9), pytest.approx(49 / 9))


def test_single_shared_words_count_unless_the_original_pseudocode_is_asked_for():
    # "red" and "car" are separate one-word overlaps (the order differs from the knowledge's)
    assert coverage_and_density("the red car", "car is red") == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert coverage_and_density("the red car", "car is red", original_off_by_one=True) == (0.0, 0.0)


def test_original_condition_also_keeps_a_shorter_run():
    # from response position 0: "a b" (2) at knowledge 0, then "a b c" (3) at knowledge 3.
    knowledge, response = "a b x a b c".split(), "a b c".split()
    assert extractive_fragment_lengths(knowledge, response) == [3]
    # the pseudo-code's |f| < i' - i - 1 never lets a run one longer replace f, and "c" alone never counts
    assert extractive_fragment_lengths(knowledge, response, original_off_by_one=True) == [2]
    assert coverage_and_density("a b x a b c", "a b c", original_off_by_one=True) == (
        pytest.approx(2 / 3), pytest.approx(4 / 3))


def test_greedy_fragments_do_not_reuse_response_tokens():
    # "b c d" is taken from position 1; position 0 "a" matched alone; then "e" (no match)
    assert extractive_fragment_lengths("b c d z a".split(), "a b c d e".split()) == [1, 3]
    assert coverage_and_density("b c d z a", "a b c d e") == (pytest.approx(4 / 5), pytest.approx(10 / 5))


@pytest.mark.parametrize("response", ["", "   ", "\n\t"])
def test_empty_or_whitespace_response_scores_zero(response):
    assert coverage_and_density("some knowledge", response) == (0.0, 0.0)


def test_case_sensitive_whitespace_tokens():
    assert coverage_and_density("Paris is nice", "paris is nice") == (pytest.approx(2 / 3), pytest.approx(4 / 3))
    assert coverage_and_density("France.", "France .") == (0.0, 0.0)


def test_knowledge_overlap_summary_mean_and_population_std():
    summary = knowledge_overlap_summary(["a b", "a b"], ["a b", "x y"])  # coverage 1 and 0, density 2 and 0
    assert summary == {"coverage": 0.5, "coverage_std": 0.5, "density": 1.0, "density_std": 1.0}
    with pytest.raises(ValueError, match="2 knowledge texts for 1 responses"):
        knowledge_overlap_summary(["a", "b"], ["a"])


def test_knowledge_is_read_from_the_dialogue_prompt():
    prompt = dialogue_prompt("paris is the capital of france", f"where should i go{EOS}have you been?")
    assert dialogue_knowledge(prompt) == "paris is the capital of france"
    with pytest.raises(ValueError, match="must start with"):
        dialogue_knowledge("no knowledge here<|endoftext|>")


# --------------------------------------------------------------------------- METEOR by hand
EXACT_ONLY = meteor.MeteorMatcher(stem=lambda w: w)


def test_meteor_perfect_match():
    tokens = "the cat sat on a mat".split()
    # P = R = 1, one chunk of 6: (1 - 0.5 (1/6)^3) * 1
    assert meteor.sentence_meteor(tokens, tokens, EXACT_ONLY) == pytest.approx(1 - 0.5 / 216)


def test_meteor_reordered_sentence_has_two_chunks():
    hyp, ref = "on a mat the cat sat".split(), "the cat sat on a mat".split()
    matches = meteor.align(hyp, ref, EXACT_ONLY)
    assert matches == [(0, 3), (1, 4), (2, 5), (3, 0), (4, 1), (5, 2)]
    assert meteor.count_chunks(matches) == 2
    assert meteor.sentence_meteor(hyp, ref, EXACT_ONLY) == pytest.approx(1 - 0.5 * (2 / 6) ** 3)


def test_meteor_greedy_alignment_of_repeated_words_follows_nltk():
    # NLTK aligns hypothesis words from the last, each to the last free reference copy: 5 chunks, not 2
    hyp, ref = "on the mat the cat sat".split(), "the cat sat on the mat".split()
    matches = meteor.align(hyp, ref, EXACT_ONLY)
    assert matches == [(0, 3), (1, 0), (2, 5), (3, 4), (4, 1), (5, 2)]
    assert meteor.count_chunks(matches) == 5
    assert meteor.sentence_meteor(hyp, ref, EXACT_ONLY) == pytest.approx(1 - 0.5 * (5 / 6) ** 3)


def test_meteor_no_overlap_and_empty_are_zero():
    assert meteor.sentence_meteor("a b c".split(), "x y".split(), EXACT_ONLY) == 0.0
    assert meteor.sentence_meteor([], "x y".split(), EXACT_ONLY) == 0.0
    assert meteor.sentence_meteor("x y".split(), [], EXACT_ONLY) == 0.0


def test_meteor_stem_stage_by_hand():
    hyp, ref = "the cats were running".split(), "a cat runs".split()
    assert meteor.sentence_meteor(hyp, ref, EXACT_ONLY) == 0.0
    # Porter: cats -> cat, running / runs -> run: matches (1, 1) and (3, 2), two chunks
    precision, recall = 2 / 4, 2 / 3
    fmean = precision * recall / (0.9 * precision + 0.1 * recall)
    assert meteor.sentence_meteor(hyp, ref) == pytest.approx((1 - 0.5 * 1.0) * fmean)


def test_meteor_is_case_insensitive():
    assert meteor.sentence_meteor(["Paris"], ["paris"], EXACT_ONLY) == pytest.approx(0.5)


def test_meteor_from_counts_formula():
    # m = 3, c = 2, |h| = 4, |r| = 5: P = 0.75, R = 0.6
    fmean = 0.75 * 0.6 / (0.9 * 0.75 + 0.1 * 0.6)
    assert meteor.meteor_from_counts(3, 2, 4, 5) == pytest.approx((1 - 0.5 * (2 / 3) ** 3) * fmean)


def test_corpus_meteor_is_the_mean_over_every_pair():
    hyps, refs = ["the cat sat", "nothing here"], ["the cat sat", "completely different"]
    per_pair = [meteor.sentence_meteor(meteor.meteor_tokens(h), meteor.meteor_tokens(r)) for h, r in zip(hyps, refs)]
    assert per_pair[1] == 0.0 and per_pair[0] > 0.9
    assert meteor.corpus_meteor(hyps, refs) == pytest.approx(sum(per_pair) / 2)
    with pytest.raises(ValueError):
        meteor.corpus_meteor(["a"], [])


def test_meteor_tokens_split_sentences_then_treebank():
    assert meteor.meteor_tokens("I can't go. He said no, ok.") == ["I", "ca", "n't", "go", ".", "He", "said", "no",
                                                                   ",", "ok", "."]
    assert meteor.meteor_tokens("   ") == []


def test_matcher_reports_its_stages():
    assert EXACT_ONLY.stages == "exact+stem"
    assert meteor.MeteorMatcher(stem=str, synonyms=lambda w: set()).stages == "exact+stem+wordnet"
    assert meteor.default_matcher().stages in ("exact+stem", "exact+stem+wordnet")


# --------------------------------------------------------------------------- METEOR against NLTK's own code
class _Lemma:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class _Synset:
    def __init__(self, names):
        self._lemmas = [_Lemma(n) for n in names]

    def lemmas(self):
        return self._lemmas


class _StubWordNet:
    """WordNet's ``synsets(word)`` interface over a small table (the real data cannot be downloaded here)."""

    def __init__(self, table):
        self.table = table

    def synsets(self, word):
        return [_Synset(names) for names in self.table.get(word, [])]


def _random_sentences(seed: int, n: int):
    vocab = ["the", "The", "cat", "cats", "run", "running", "runs", "dog", "dogs", "big", "large", "jump", "jumped",
             "a", "on", "mat", "quick", "quickly", "happy", "glad", "sat"]
    rng = random.Random(seed)
    return [([rng.choice(vocab) for _ in range(rng.randint(0, 9))],
             [rng.choice(vocab) for _ in range(rng.randint(0, 9))])
            for _ in range(n)]


def test_agrees_with_nltk_exact_and_stem_without_wordnet():
    from nltk.translate.meteor_score import single_meteor_score

    no_synonyms = _StubWordNet({})
    matcher = meteor.MeteorMatcher(stem=meteor.default_matcher().stem)
    for hyp, ref in _random_sentences(0, 400):
        expected = single_meteor_score(ref, hyp, wordnet=no_synonyms)
        assert meteor.sentence_meteor(hyp, ref, matcher) == pytest.approx(expected, abs=1e-12), (hyp, ref)


def test_agrees_with_nltk_synonym_stage_on_stems():
    from nltk.translate.meteor_score import single_meteor_score

    table = {"big": [["large", "big"]], "larg": [["big"]], "happi": [["glad", "felicitous"]],
             "quick": [["fast", "quick_time"]], "jump": [["leap", "jump"]]}
    stub = _StubWordNet(table)

    def synonyms(word):
        return {name for names in table.get(word, []) for name in names if "_" not in name}

    matcher = meteor.MeteorMatcher(stem=meteor.default_matcher().stem, synonyms=synonyms)
    scores = []
    for hyp, ref in _random_sentences(1, 400) + [(["big", "happy"], ["large", "glad"])]:
        expected = single_meteor_score(ref, hyp, wordnet=stub)
        scores.append(meteor.sentence_meteor(hyp, ref, matcher))
        assert scores[-1] == pytest.approx(expected, abs=1e-12), (hyp, ref)
    # "happy" stems to "happi", whose (stub) synonym "glad" is the reference word: a stage-3 match
    assert scores[-1] > meteor.sentence_meteor(["big", "happy"], ["large", "glad"],
                                               meteor.MeteorMatcher(stem=meteor.default_matcher().stem))


# --------------------------------------------------------------------------- summaries, trainer, aggregator
def test_summarize_generations_adds_overlap_and_meteor_before_n():
    out = summarize_generations(["a b c", "x"], {"final_reward": [1.0, 0.0]}, golds=["a b c", "y"],
                                knowledge=["a b", "q"])
    assert list(out)[-6:] == ["coverage", "coverage_std", "density", "density_std", "meteor", "n"]
    assert out["coverage"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["density"] == pytest.approx((4 / 3 + 0) / 2)
    assert out["meteor"] == pytest.approx(meteor.corpus_meteor(["a b c", "x"], ["a b c", "y"]))
    assert "meteor" not in summarize_generations(["a"], {}) and "coverage" not in summarize_generations(["a"], {})


def test_gold_texts_drop_end_markers():
    from lolrl.engine.data import Record
    from lolrl.engine.validation import gold_texts

    records = [Record("1", "p", f"yes paris {EOS}"), Record("2", "p", "done</s>")]
    assert gold_texts(records, (EOS, "</s>")) == ["yes paris", "done"]


def test_dialogue_task_metrics_in_the_tables_and_the_aggregator(tmp_path, capsys):
    import paper_tiny

    from lolrl.tasks.paper.aggregate import main as aggregate_main
    from lolrl.tasks.paper.cli import main as train_main
    from lolrl.tasks.paper.rewards import TFIDF_FILE, TfidfScorer

    models = paper_tiny.build_all(tmp_path / "models")
    data = tmp_path / "data"
    data.mkdir()
    knowledge = ["paris is the capital of france", "the dog sleeps", "europe is big"]
    answers = ["yes paris is the capital", "a cat sleeps", "i like europe"]
    for split in ("train", "val", "test"):
        rows = [{"id": i, "prompt_or_input_text": dialogue_prompt(k, f"have you been there {i}"),
                 "references": a + EOS, "reward_components": {"fluency": 0.5, "faithdial": 0.5, "depth": 0.5,
                                                              "tfidf": 0.5, "final_reward": 2.0}}
                for i, (k, a) in enumerate(zip(knowledge, answers))]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    TfidfScorer.fit(answers).save(data / TFIDF_FILE)
    run = tmp_path / "results" / "faithdial" / "dgpt_nll" / "train_log"
    assert train_main(["-i", str(data), "-tn", "faithdial", "-m", models["policy"], "-o", str(run), "-algo", "wbc",
                       "-cm", models["cola"], "-fcm", models["faithcritic"], "-dcm", models["depth"],
                       "-e", "1", "-bs", "2", "-v_bs", "4", "-ml", "6", "--max_steps", "1", "-vf", "1",
                       "--num_beams", "1", "-t"]) == 0
    results = json.loads((run / "eval_results.json").read_text())
    gold = knowledge_overlap_summary(knowledge, answers)  # the gold texts without EOS
    assert gold["coverage"] == pytest.approx((4 / 5 + 1 / 3 + 1 / 3) / 3)
    for split in ("val", "test"):
        generated, reference = results[f"{split}/generated"], results[f"{split}/gold"]
        for key, value in gold.items():
            assert reference[key] == pytest.approx(value)
        assert {"coverage", "coverage_std", "density", "density_std", "meteor"} <= set(generated)
        assert 0.0 <= generated["meteor"] <= 1.0 and "meteor" not in reference
        completions = [json.loads(line)["response"] for line in (run / f"{split}_generations.jsonl").open()]
        assert generated["meteor"] == pytest.approx(meteor.corpus_meteor(completions, answers))
        assert generated["coverage"] == pytest.approx(knowledge_overlap_summary(knowledge, completions)["coverage"])
    validations = [json.loads(line) for line in (run / "validation_stats.jsonl").open()]
    assert validations and all("meteor" in v for v in validations)

    # a non-paper task name: the original's default success metric, meteor, read from the generated rows
    (tmp_path / "results" / "mydialogue").symlink_to(tmp_path / "results" / "faithdial")
    out_csv = tmp_path / "agg.csv"
    aggregate_main(["-bmps", "{'dgpt_nll': False}", "-tn", "mydialogue", "-o", str(out_csv),
                    "--results_dir", str(tmp_path / "results")])
    assert "success metric meteor" in capsys.readouterr().err
    row = next(csv.DictReader(out_csv.open()))
    assert float(row["val_meteor"]) == pytest.approx(results["val/generated"]["meteor"], abs=5e-4)
    assert float(row["test_gold coverage"]) == pytest.approx(gold["coverage"], abs=5e-4)
    assert row["best V meteor"] != "NA"
