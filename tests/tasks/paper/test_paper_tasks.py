"""The paper's small-model tasks: reward transforms, raw readers, preprocessing scripts end to end on
raw-format fixtures with tiny random classifiers, a few training steps on their output, the Keras
critic conversion and the aggregation."""
import csv
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the tests folder: paper_tiny
import paper_tiny

from lolrl.engine.data import DataError, load_jsonl
from lolrl.tasks.paper import data as paper_data
from lolrl.tasks.paper import rewards as paper_rewards
from lolrl.tasks.paper.rewards import EOS

LN3 = math.log(3.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return paper_tiny.build_all(tmp_path_factory.mktemp("paper_models"))


# --------------------------------------------------------------------------- transforms on hand-made logits
def test_transforms_pick_the_documented_probability():
    two = torch.tensor([[0.0, LN3], [LN3, 0.0]])  # softmax = [0.25, 0.75] and [0.75, 0.25]
    assert paper_rewards.cola_transform(two).tolist() == pytest.approx([0.75, 0.25])  # P(LABEL_1)
    assert paper_rewards.safe_transform(two).tolist() == pytest.approx([0.25, 0.75])  # class 0 = safe = 1 - P(off)
    assert paper_rewards.faithcritic_transform(two).tolist() == pytest.approx([0.25, 0.75])  # index 0 = faithful
    assert paper_rewards.dialogrpt_transform(torch.tensor([[0.0], [LN3]])).tolist() == pytest.approx([0.5, 0.75])
    head = paper_rewards.CometCriticHead(2, 1)
    with torch.no_grad():
        head.dense.weight.copy_(torch.tensor([[1.0, 0.0]]))
        head.dense.bias.zero_()
        head.out_proj.weight.fill_(1.0)
        head.out_proj.bias.fill_(0.0)
    x = torch.tensor([[2.0, 5.0]])  # gelu(2) = 2 * Phi(2) (exact erf form), then sigmoid
    gelu2 = 2.0 * 0.5 * (1 + math.erf(2.0 / math.sqrt(2)))
    assert head(x).item() == pytest.approx(1 / (1 + math.exp(-gelu2)))


def test_tfidf_matches_hand_computation():
    scorer = paper_rewards.TfidfScorer.fit(["the cat sat" + EOS, "the dog sat", "a cat"])
    # "a" is one character (ignored, as CountVectorizer); the EOS is not a term; n = 3 documents
    assert set(scorer.idf) == {"the", "cat", "sat", "dog"}
    assert scorer.idf["the"] == pytest.approx(math.log(4 / 3) + 1)
    assert scorer.idf["dog"] == pytest.approx(math.log(4 / 2) + 1)
    the, dog = math.log(4 / 3) + 1, math.log(2) + 1
    norm = math.sqrt(the ** 2 + dog ** 2)
    assert scorer.score("The dog!" + EOS) == pytest.approx((the / norm + dog / norm) / 2 * 0.2)  # k = 2 -> x 0.2
    assert scorer.score("cat cat") == pytest.approx(0.1)  # one term: weight 1.0, penalty 1/10
    assert scorer.score("zebra a") == 0.0
    five = paper_rewards.TfidfScorer({w: 1.0 for w in ["ab", "cd", "ef", "gh", "ij"]})
    assert five.score("ab cd ef gh ij") == pytest.approx(1 / math.sqrt(5))  # k = 5: no penalty


def test_tfidf_agrees_with_scikit_learn_when_installed():
    sklearn_text = pytest.importorskip("sklearn.feature_extraction.text")
    docs = ["the cat sat on the mat", "dogs and cats", "the dog sat", "a b c the end of it"]
    cv = sklearn_text.CountVectorizer()
    tf = sklearn_text.TfidfTransformer(smooth_idf=True, use_idf=True).fit(cv.fit_transform(docs))
    ours = paper_rewards.TfidfScorer.fit(docs)
    for text in ("the cat and the dog", "mat end"):
        row = tf.transform(cv.transform([text]))
        k = row.nnz
        expected = row.data.mean() * (k / 10 if k < 5 else 1)
        assert ours.score(text) == pytest.approx(expected)


def test_ngram_diversity_by_hand():
    scores = paper_rewards.ngram_diversity(["p"] * 4, ["a b a b", "a", "", "x y z" + EOS])
    assert scores[0] == pytest.approx(2 / 4 + 2 / 3 + 2 / 2)
    assert scores[1] == pytest.approx(1.0)  # no bigrams or trigrams: those terms are 0
    assert scores[2] == 0.0  # the original divided by zero here
    assert scores[3] == pytest.approx(3.0)  # the trailing EOS is not a token


def test_text_helpers():
    prompt = f"Knowledge: Paris is the capital.{EOS}Where to?{EOS}Europe?{EOS}"
    assert paper_rewards.split_dialogue_prompt(prompt) == (" Paris is the capital.", f"Where to?{EOS}Europe?{EOS}")
    with pytest.raises(ValueError):
        paper_rewards.split_dialogue_prompt("Where to?" + EOS)
    comet = paper_data.comet_prompt("  PersonX buys a car ", "xWant")
    assert comet == "<head> PersonX buys a car </head> <relation> xWant </relation> [GEN] "
    assert paper_rewards.parse_comet_prompt(comet) == ("PersonX buys a car", "xWant")
    assert paper_rewards.strip_eos("hi" + EOS + EOS) == "hi" + EOS
    left, right = paper_rewards.comet_critic_inputs("PersonX meets PersonY", "xReact", "happy", random.Random(0))
    assert "PersonX" not in left + right and "PersonY" not in left + right
    assert right.startswith("as a result, ") and right.endswith(" feels happy")
    first, second = left.split(" meets ")
    assert first != second and first in paper_rewards.FIRST_NAMES and right.split(" ")[3] == first


# --------------------------------------------------------------------------- components on tiny models
def test_dialogrpt_scores_the_last_real_token(models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = paper_rewards.DialogRPTScore(models["updown"], key="updown", batch_size=8)
    prompts = ["what do you think about this game" + EOS] * 2 + ["i love the movie" + EOS]
    responses = ["it is really good" + EOS, "bad", "yes"]
    scores = scorer(prompts, responses)
    assert scores[0] != pytest.approx(scores[1])  # the response matters (the original's pooling ignored it)
    tok = AutoTokenizer.from_pretrained(models["updown"])
    model = AutoModelForSequenceClassification.from_pretrained(models["updown"]).eval()
    for prompt, response, score in zip(prompts, responses, scores):
        ids = torch.tensor([tok(prompt + paper_rewards.strip_eos(response))["input_ids"]])
        with torch.no_grad():
            hidden = model.transformer(ids).last_hidden_state[0, -1]
            expected = torch.sigmoid(model.score(hidden)[0]).item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert scorer(prompts[:1], responses[:1]) == pytest.approx(scores[:1], abs=1e-6)  # a batch of one is a list


def test_toxichat_cola_faithcritic_against_direct_computation(models):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    safety = paper_rewards.ToxiChatSafety(models["offensive"], max_length=24)
    prompt, response = "what do you think" + EOS, "i hate this game" + EOS
    long_prompt = " ".join(["really"] * 60) + EOS  # longer than max_length: the start is cut, no crash
    scores = safety([prompt, long_prompt], [response, "good"])
    tok = AutoTokenizer.from_pretrained(models["offensive"])
    ids = tok(prompt + "i hate this game" + EOS, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = safety.model.transformer(torch.tensor([ids])).last_hidden_state[0, -1]
        expected = torch.softmax(safety.model.off_classifier(hidden), -1)[0].item()
    assert scores[0] == pytest.approx(expected, abs=1e-5) and 0 < scores[1] < 1

    rtok = AutoTokenizer.from_pretrained(models["cola"])
    cola = AutoModelForSequenceClassification.from_pretrained(models["cola"]).eval()
    with torch.no_grad():
        expected = torch.softmax(cola(**rtok(["it is good"], return_tensors="pt")).logits, -1)[0, 1].item()
    assert paper_rewards.CoLAFluency(models["cola"])(["x"], ["it is good" + EOS]) == pytest.approx([expected], abs=1e-5)

    critic = AutoModelForSequenceClassification.from_pretrained(models["faithcritic"]).eval()
    dialogue = f"Knowledge: paris is the capital{EOS}where should i travel{EOS}"
    with torch.no_grad():
        enc = rtok([" paris is the capital"], ["go to paris"], return_tensors="pt")
        expected = torch.softmax(critic(**enc).logits, -1)[0, 0].item()
    scores = paper_rewards.FaithCritic(models["faithcritic"])([dialogue], ["go to paris"])
    assert scores == pytest.approx([expected], abs=1e-5)


def test_missing_local_model_is_a_one_line_error(tmp_path):
    from lolrl.engine.rewards import RewardSpecError

    with pytest.raises(RewardSpecError, match="-om .*no such folder"):
        paper_rewards.ToxiChatSafety(str(tmp_path / "nope"))
    with pytest.raises(RewardSpecError, match="HF_HUB_OFFLINE"):
        paper_rewards.CoLAFluency("textattack/roberta-base-CoLA")


# --------------------------------------------------------------------------- the Keras critic conversion
@pytest.fixture(scope="module")
def comet_critic(models, tmp_path_factory):
    """A tiny RoBERTa + head exported under the Keras critic's names, converted by the script."""
    from transformers import AutoConfig, RobertaModel

    from lolrl.tasks.paper.comet_convert import main as convert_main

    root = tmp_path_factory.mktemp("critic")
    torch.manual_seed(5)
    model = RobertaModel(AutoConfig.from_pretrained(models["roberta"]), add_pooling_layer=True).eval()
    dense, out = torch.nn.Linear(16, 8), torch.nn.Linear(8, 1)
    weights = paper_tiny.keras_weights_of(model, dense, out)
    assert "roberta/encoder/layer_._1/attention/self/query/kernel:0" in weights
    np.savez(root / "critic.npz", **weights)
    assert convert_main(["-i", str(root / "critic.npz"), "-o", str(root / "converted"),
                         "--roberta_config", models["roberta"], "--tokenizer", models["roberta"]]) == 0
    return {"dir": str(root / "converted"), "model": model, "dense": dense, "out": out, "weights": weights}


def test_conversion_maps_names_and_transposes(comet_critic):
    from transformers import AutoModel

    from lolrl.tasks.paper.comet_convert import ConversionError, convert_weights, tf_to_pt_name

    assert tf_to_pt_name("roberta/encoder/layer_._0/intermediate/dense/kernel:0") == (
        "encoder", "encoder.layer.0.intermediate.dense.weight", True)
    assert tf_to_pt_name("tf_roberta/roberta/embeddings/LayerNorm/gamma:0") == (
        "encoder", "embeddings.LayerNorm.weight", False)
    assert tf_to_pt_name("dense_1/kernel:0") == ("head", "out_proj.weight", True)
    converted = AutoModel.from_pretrained(comet_critic["dir"])
    original = comet_critic["model"]
    for name, param in original.named_parameters():
        assert torch.equal(param, converted.state_dict()[name]), name
    head = paper_rewards.load_comet_head(comet_critic["dir"])
    assert torch.equal(head.dense.weight, comet_critic["dense"].weight)  # kernel (16 x 8) transposed back
    assert torch.equal(head.out_proj.weight, comet_critic["out"].weight)
    report = json.loads((Path(comet_critic["dir"]) / "conversion_report.json").read_text())
    n_layers, kernels_per_layer = 2, 6  # q, k, v, attention output, intermediate, output; + the pooler
    assert report["transposed"] == n_layers * kernels_per_layer + 1 + 2  # + the head's two kernels
    shapes = {n: tuple(p.shape) for n, p in original.named_parameters()}
    broken = [(k, v) for k, v in comet_critic["weights"].items() if "pooler" not in k]
    with pytest.raises(ConversionError, match="missing \\['pooler.dense.bias', 'pooler.dense.weight'\\]"):
        convert_weights(broken, shapes)


def test_comet_critic_scores_pairs_with_names(comet_critic):
    from transformers import AutoTokenizer

    critic = paper_rewards.CometCritic(comet_critic["dir"], name_samples=2)
    prompt = paper_data.comet_prompt("PersonX buys a car", "xWant")
    scores = critic([prompt, prompt], ["to drive it", "to drive it"])
    assert scores[0] == scores[1]  # seeded per row: reproducible
    tok = AutoTokenizer.from_pretrained(comet_critic["dir"])
    total = 0.0
    for k in range(2):
        import hashlib

        seed = hashlib.sha256(f"{k}\x00PersonX buys a car\x00xWant\x00to drive it".encode()).hexdigest()
        left, right = paper_rewards.comet_critic_inputs("PersonX buys a car", "xWant", "to drive it",
                                                        random.Random(seed))
        with torch.no_grad():
            pooled = comet_critic["model"](**tok([left], [right], return_tensors="pt")).pooler_output
            gelu = torch.nn.functional.gelu(comet_critic["dense"](pooled))
            total += torch.sigmoid(comet_critic["out"](gelu)).item()
    assert scores[0] == pytest.approx(total / 2, abs=1e-5)


# --------------------------------------------------------------------------- raw readers
def test_wow_extraction_keeps_every_turn_in_the_history():
    dialogue = {"dialog": [
        {"speaker": "0_Wizard", "text": "W0", "checked_sentence": {"a": "K0"}},  # empty history: no example
        {"speaker": "1_Apprentice", "text": "A1"},
        {"speaker": "0_Wizard", "text": "W1", "checked_sentence": {"b": "K1"}},
        {"speaker": "1_Apprentice", "text": "A2"},
        {"speaker": "0_Wizard", "text": "W2", "checked_sentence": {}},  # no example, still in the history (fix)
        {"speaker": "1_Apprentice", "text": "A3"},
        {"speaker": "0_Wizard", "text": "W3", "checked_sentence": {"c": "no_passages_used"}},
        {"speaker": "1_Apprentice", "text": "A4"},
        {"speaker": "0_Wizard", "text": "W4", "checked_sentence": {"d": "K4"}}]}
    examples = paper_data.extract_wow_examples([dialogue], "train.json")
    assert [(e["dialog_idx"], e["response"], e["knowledge"]) for e in examples] == [(0, "W1", "K1"), (1, "W4", "K4")]
    assert examples[1]["history"] == ["W0", "A1", "W1", "A2", "W2", "A3", "W3", "A4"]
    bad = {"dialog": [{"speaker": "2_Bot", "text": "x", "checked_sentence": {}}]}
    with pytest.raises(DataError, match=r"train.json: field '\[1\].dialog\[0\].speaker'"):
        paper_data.extract_wow_examples([dialogue, bad], "train.json")


def test_history_compression_drops_oldest_utterances(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["policy"])
    long = " ".join(["the"] * 150)
    assert 134 <= len(tok(long + " one")["input_ids"]) < 200  # three of them exceed 400 tokens, two do not
    history = EOS.join([long + " one", long + " two", long + " three", "short"])
    compressed = paper_data.compress_history(history, tok)
    assert compressed == f"{long} two{EOS}{long} three{EOS}short" and len(tok(compressed)["input_ids"]) <= 400
    single = paper_data.compress_history(" ".join(["europe"] * 500), tok)  # one utterance too long (was IndexError)
    assert len(tok(single)["input_ids"]) <= 401


def test_reddit_csv_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "comments_positive.csv"
    path.write_text("id,text,parent_text,score,parent_score\na1,hi,\"multi\nline\",5,3\na2,yo,hey,lots,2\n")
    with pytest.raises(DataError, match=r"comments_positive.csv:4: field 'score': expected a number, got 'lots'"):
        paper_data.read_reddit_csv(path)
    path.write_text("id,text,score,parent_score\n")
    with pytest.raises(DataError, match="comments_positive.csv:1: field 'parent_text': missing column"):
        paper_data.read_reddit_csv(path)


# --------------------------------------------------------------------------- Reddit end to end
REDDIT_HEADER = ["id", "parent_id", "subreddit_id", "link_id", "text", "score", "ups", "author", "controversiality",
                 "parent_link_id", "parent_text", "parent_score", "parent_ups", "parent_author",
                 "parent_controversiality"]


def _reddit_rows(kind: str) -> list[dict]:
    sign = 1 if kind == "pos" else -1
    gibberish = " ".join("".join(random.Random(i).choices("qxzjvkw", k=9)) for i in range(60))
    texts = [("what do you think about this game", "it is really good"),
             ("i love the   movie\n so much", "me too, great idea"),
             ("where should i travel", "check https://www.example.com/page?x=1 now"),
             ("NA", "parent is missing"),  # pandas reads NA as missing: dropped
             ("is this real", ""),  # missing text: dropped
             (" ".join(["word"] * 101), "too long parent"),  # > 100 words
             ("funny", gibberish),  # <= 100 words but > 300 tokens
             ("yes or no", "maybe"), ("cat or dog", "dog"), ("nice car", "thanks lol")]
    rows = []
    for i, (parent, text) in enumerate(texts):
        rows.append({"id": f"{kind}{i}", "parent_id": f"t1_{kind}{i}", "subreddit_id": "t5_x", "link_id": "t3_x",
                     "text": text, "score": sign * (10 + i), "ups": sign * (10 + i), "author": "u",
                     "controversiality": 0, "parent_link_id": "t3_x", "parent_text": parent, "parent_score": 5 + i,
                     "parent_ups": 5 + i, "parent_author": "v", "parent_controversiality": 0})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REDDIT_HEADER)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def reddit_dir(models, tmp_path_factory):
    from lolrl.tasks.paper.preprocess import preprocess_reddit, reddit_parser, run_main

    raw, out = tmp_path_factory.mktemp("reddit_raw"), tmp_path_factory.mktemp("reddit_pre")
    _write_csv(raw / "comments_positive.csv", _reddit_rows("pos"))
    _write_csv(raw / "comments_negative.csv", _reddit_rows("neg"))
    argv = ["-i", str(raw), "-o", str(out), "-m", models["policy"], "-cm", models["cola"], "-ucm", models["updown"],
            "-dcm", models["depth"], "-om", models["offensive"], "-bs", "4", "--held_out", "2", "-pd"]
    assert run_main(preprocess_reddit, reddit_parser(), argv) == 0
    return raw, out


def test_reddit_preprocessing_filters_splits_and_scores(reddit_dir, models):
    import pandas as pd

    raw, out = reddit_dir
    kept = {}
    for kind in ("pos", "neg"):  # pandas as the original used it: dropna, then sample(random_state=901)
        frame = pd.read_csv(raw / f"comments_{'positive' if kind == 'pos' else 'negative'}.csv")
        frame = frame.dropna(subset=["parent_text", "text"])
        sampled = list(frame.sample(len(frame), random_state=901)["id"])
        kept[kind] = [i for i in sampled if i not in (f"{kind}5", f"{kind}6")]  # > 100 words, > 300 tokens
        assert len(sampled) == 8 and len(kept[kind]) == 6
    test, val = load_jsonl(out / "test.jsonl"), load_jsonl(out / "val.jsonl")
    pos_train, neg_train = load_jsonl(out / "pos_train.jsonl", True), load_jsonl(out / "neg_train.jsonl", True)
    assert [r.id for r in test] == kept["pos"][:2] + kept["neg"][:2]
    assert [r.id for r in val] == kept["pos"][2:4] + kept["neg"][2:4]
    assert [r.id for r in pos_train] == kept["pos"][4:] and [r.id for r in neg_train] == kept["neg"][4:]
    records = {r.id: r for r in test + val + pos_train + neg_train}
    assert records["pos2"].prompt == "where should i travel" + EOS
    assert records["pos2"].response == "check <URL> now" + EOS
    assert records["pos1"].prompt == "i love the movie so much" + EOS  # whitespace collapsed
    assert records["neg0"].meta == {"score": -10, "parent_score": 5}
    for record in records.values():
        components = record.reward_components
        assert list(components) == ["fluency", "depth", "updown", "safe", "tfidf", "final_reward"]
        assert components["final_reward"] == pytest.approx(sum(v for k, v in components.items() if k != "final_reward"))
        assert all(0 <= v <= 1 for k, v in components.items() if k != "final_reward")
    tfidf = paper_rewards.TfidfScorer.load(out / "tfidf.json")
    train_terms = {t for r in pos_train + neg_train
                   for t in paper_rewards.tfidf_terms(paper_rewards.strip_eos(r.response))}
    assert set(tfidf.idf) == train_terms and "endoftext" not in tfidf.idf  # train references, without the EOS
    fluency = paper_rewards.CoLAFluency(models["cola"])
    assert records["pos0"].reward_components["fluency"] == pytest.approx(fluency(["x"], ["it is really good"])[0],
                                                                         abs=1e-6)
    for name in ("output.log", "preprocess_summary.json", "per_component_reward_distribution_plot_test.png",
                 "positive_comments_score_distribution.png"):
        assert (out / name).exists(), name
    assert "updown accuracy" in (out / "output.log").read_text()


# --------------------------------------------------------------------------- WoW / FaithDial end to end
def _wow_dialogues(tag: str, n: int) -> list[dict]:
    dialogues = []
    for d in range(n):
        dialogues.append({"chosen_topic": "paris", "persona": "", "wizard_eval": 5, "chosen_topic_passage": [],
                          "dialog": [{"speaker": "1_Apprentice", "text": f"where should i travel {tag}{d}"},
                                     {"speaker": "0_Wizard", "text": f"paris is great {tag}{d}",
                                      "checked_sentence": {"chosen_Paris_0": "paris is the capital of france"},
                                      "checked_passage": {}, "retrieved_passages": [], "retrieved_topics": []},
                                     {"speaker": "1_Apprentice", "text": "i love it"},
                                     {"speaker": "0_Wizard", "text": "we like europe",
                                      "checked_sentence": {"x": "europe is a continent"}}]})
    return dialogues


def _faithdial(tag: str, n: int) -> list[dict]:
    return [{"utterances": [{"history": [f"have you been to paris {tag}{i}"], "speaker": "Wizard",
                             "knowledge": "paris is the capital ", "original_response": "x",
                             "response": f" yes paris {tag}{i} ", "BEGIN": ["Generic"], "VRM": ["Disclosure"]}]}
            for i in range(n)]


def test_dialogue_preprocessing_faithdial_wow(models, tmp_path):
    from lolrl.tasks.paper.preprocess import dialogue_parser, preprocess_dialogue, run_main

    wow, faithdial, out = tmp_path / "wow", tmp_path / "faithdial", tmp_path / "out"
    wow.mkdir()
    faithdial.mkdir()
    (wow / "train.json").write_text(json.dumps(_wow_dialogues("t", 2)))
    (wow / "valid_topic_split.json").write_text(json.dumps(_wow_dialogues("v", 1)))
    (faithdial / "train.json").write_text(json.dumps(_faithdial("t", 2)))
    (faithdial / "valid.json").write_text(json.dumps(_faithdial("v", 2)))
    (faithdial / "test.json").write_text(json.dumps(_faithdial("s", 2)))
    argv = ["-i", "FaithDial_WoW", "-o", str(out), "-m", models["policy"], "-cm", models["cola"],
            "-fcm", models["faithcritic"], "-dcm", models["depth"], "-bs", "4", "--wow_dir", str(wow),
            "--faithdial_dir", str(faithdial)]
    assert run_main(preprocess_dialogue, dialogue_parser(), argv) == 0
    train, val, test = (load_jsonl(out / f"{s}.jsonl", s == "train") for s in ("train", "val", "test"))
    assert len(train) == 4 + 2 and len(val) == 2 + 2 and len(test) == 2
    assert sorted(int(r.id) for r in train) == list(range(6))  # FaithDial ids follow WoW's: unique (fix)
    assert [int(r.id) for r in val] == [0, 1, 2, 3]
    first_val = val[1]  # the second example of the WoW val dialogue
    assert first_val.prompt == (f"Knowledge: europe is a continent{EOS}where should i travel v0{EOS}"
                                f"paris is great v0{EOS}i love it{EOS}")
    assert first_val.response == "we like europe" + EOS
    assert first_val.meta["knowledge"] == "europe is a continent"
    assert test[0].prompt == f"Knowledge: paris is the capital{EOS}have you been to paris s0{EOS}"
    assert test[0].response == "yes paris s0" + EOS
    for record in train + val + test:
        assert list(record.reward_components) == ["fluency", "faithdial", "depth", "tfidf", "final_reward"]
    scorer = paper_rewards.FaithCritic(models["faithcritic"])
    assert test[0].reward_components["faithdial"] == pytest.approx(scorer([test[0].prompt], [test[0].response])[0],
                                                                   abs=1e-6)
    assert (out / "tfidf.json").exists() and (out / "per_component_reward_distribution_plot_train.png").exists()


def test_dialogue_split_files_per_variant(models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["policy"])
    wow = {s: paper_data.extract_wow_examples(_wow_dialogues(s, 1)) for s in ("train", "val")}
    fd = {s: paper_data.faithdial_examples(_faithdial(s, 1)) for s in ("train", "val", "test")}
    assert set(paper_data.dialogue_splits("wow", wow, fd, tok)) == {"train.jsonl", "val.jsonl", "faithdial_test.jsonl"}
    assert set(paper_data.dialogue_splits("faithdial", wow, fd, tok)) == {"train.jsonl", "val.jsonl", "test.jsonl"}


# --------------------------------------------------------------------------- COMET end to end
def test_comet_preprocessing(comet_critic, tmp_path):
    from lolrl.tasks.paper.preprocess import comet_parser, preprocess_comet, run_main

    raw, atomic, out = tmp_path / "skd", tmp_path / "atomic2020", tmp_path / "out"
    raw.mkdir()
    atomic.mkdir()
    lines = []
    for i, split in enumerate(["train", "train", "train", "val", "val", "test"]):
        lines.append({"head": f"PersonX buys a car {i}", "relation": "xWant", "tail": f"to drive it {i}",
                      "split": split, "rec_0.5": True, "p_valid_model": 0.1 * (i + 1)})
    (raw / "ATOMIC10X.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (atomic / "test.tsv").write_text("PersonX buys a car\txWant\tto drive it\n"
                                     "PersonX buys a car\txWant\tto show off\n"
                                     "PersonX buys a car\tisAfter\tPersonX saves money\n\n"
                                     "PersonX sleeps\txEffect\twakes up\n")
    argv = ["-i", str(raw), "-it", str(atomic), "-ccm", comet_critic["dir"], "-o", str(out), "-bs", "4"]
    assert run_main(preprocess_comet, comet_parser(), argv) == 0
    train = load_jsonl(out / "train.jsonl", True)
    assert train[0].prompt == "<head> PersonX buys a car 0 </head> <relation> xWant </relation> [GEN] "
    assert [r.reward for r in train] == pytest.approx([0.1, 0.2, 0.3]) and train[0].response == "to drive it 0"
    assert len(load_jsonl(out / "val.jsonl")) == 2 and len(load_jsonl(out / "test_atomic10x.jsonl")) == 1
    test = load_jsonl(out / "test.jsonl")
    assert [r.prompt for r in test] == [paper_data.comet_prompt("PersonX buys a car", "xWant"),
                                        paper_data.comet_prompt("PersonX sleeps", "xEffect")]  # isAfter dropped
    critic = paper_rewards.CometCritic(comet_critic["dir"])
    drive, show = critic.score_triples([("PersonX buys a car", "xWant", "to drive it"),
                                        ("PersonX buys a car", "xWant", "to show off")])
    assert test[0].response == ("to drive it" if drive >= show else "to show off")
    assert test[0].reward == pytest.approx(max(drive, show), abs=1e-6)
    assert test[0].meta["tails"] == ["to drive it", "to show off"]


# --------------------------------------------------------------------------- training on the output, aggregation
def _train(args: list[str]) -> int:
    from lolrl.tasks.paper.cli import main

    return main(args + ["-e", "1", "-bs", "2", "-v_bs", "4", "-ml", "6", "--max_steps", "2", "-vf", "1",
                        "--num_beams", "1", "-lr", "1e-3", "-t"])


def test_training_with_the_recipe_then_aggregation(reddit_dir, models, tmp_path, capsys):
    from lolrl.tasks.paper.aggregate import main as aggregate_main

    _, data = reddit_dir
    results = tmp_path / "final_results"
    flags = ["-cm", models["cola"], "-ucm", models["updown"], "-dcm", models["depth"], "-om", models["offensive"]]
    nll_out = results / "reddit_pos" / "dgpt_nll" / "train_log"
    assert _train(["-i", str(data), "-tn", "reddit_pos", "-m", models["policy"], "-o", str(nll_out),
                   "-s", str(tmp_path / "nll_model"), "-algo", "nll", *flags]) == 0
    a_lol_out = results / "reddit_pos" / "dgpt_nll_a_lol" / "train_log"
    assert _train(["-i", str(data), "-tn", "REDDIT_POS", "-m", str(tmp_path / "nll_model"), "-o", str(a_lol_out),
                   "-algo", "a_lol", "-ev_b", *flags]) == 0
    # the trainer's recipe reproduces the preprocessed rewards of the training rows exactly
    assert json.loads((a_lol_out / "reward_check.json").read_text())["max_abs_diff"] < 1e-5
    generated = json.loads((a_lol_out / "eval_results.json").read_text())["test/generated"]
    assert {"fluency", "depth", "updown", "safe", "tfidf", "final_reward"} <= set(generated)
    partial = results / "reddit_pos" / "dgpt_nll_wbc" / "train_log"
    partial.mkdir(parents=True)
    (partial / "validation_stats.jsonl").write_text('{"step": 1, "epoch": 0.5, "final_reward": 1.0}\n')
    capsys.readouterr()
    out_csv = tmp_path / "reddit_pos_final_results.csv"
    assert aggregate_main(["-bmps", "{'dgpt_nll': True}", "-tn", "reddit_pos", "-o", str(out_csv),
                           "--results_dir", str(results)]) == 0
    err = capsys.readouterr().err
    assert "partial: dgpt_nll / wbc" in err and "missing: dgpt_nll / a_lol_seq" in err
    rows = list(csv.DictReader(out_csv.open()))
    by_algo = {r["algorithm"]: r for r in rows}
    assert len(rows) == 8 and by_algo["nll"]["status"] == by_algo["a_lol"]["status"] == "complete"
    assert by_algo["wbc"]["status"].startswith("partial") and by_algo["wbc"]["best V final_reward"] == "1.000"
    assert by_algo["r_lol"]["status"] == "missing" and by_algo["r_lol"]["test_final_reward"] == "NA"
    assert float(by_algo["a_lol"]["test_final_reward"]) == pytest.approx(generated["final_reward"], abs=5e-4)
    header = next(csv.reader(out_csv.open()))
    assert header[:12] == ["task_name", "baseline_model", "algorithm", "status", "best e", "best s",
                           "best V final_reward", "worst e", "worst s", "worst V final_reward", "val_final_reward",
                           "test_final_reward"]
    assert "test_gold safe" in header and "val_gen distinct_2" in header
    assert out_csv.with_suffix(".md").read_text().startswith("| task_name | baseline_model |")


def test_aggregator_never_evaluates_prefixes(tmp_path, capsys):
    from lolrl.tasks.paper.aggregate import main as aggregate_main
    from lolrl.tasks.paper.aggregate import parse_prefixes

    assert parse_prefixes('{"dgpt_nll": false}') == {"dgpt_nll": False}
    assert parse_prefixes("['a', 'b']") == {"a": True, "b": True}
    assert aggregate_main(["-bmps", "__import__('os').system('echo hi')", "-tn", "wow", "-o",
                           str(tmp_path / "x.csv"), "--results_dir", str(tmp_path)]) == 2
    assert "neither JSON nor a Python literal" in capsys.readouterr().err
    assert aggregate_main(["-bmps", "{'dgpt_nll': False}", "-tn", "WOW", "-o", str(tmp_path / "x.csv"),
                           "--results_dir", str(tmp_path)]) == 1  # nothing there: every run reported missing
    assert len(list(csv.DictReader((tmp_path / "x.csv").open()))) == 4  # nll, wbc, r_gold, r_lol


def test_comet_training_uses_the_critic_and_stops_at_period(comet_critic, models, tmp_path):
    from transformers import AutoTokenizer

    from lolrl.engine.config import OfflineRLConfig
    from lolrl.engine.data import TaskData
    from lolrl.tasks.paper.tasks import task_info

    data = tmp_path / "comet"
    data.mkdir()
    for split, n in (("train", 4), ("val", 4), ("test", 2)):
        rows = [{"id": i, "prompt_or_input_text": paper_data.comet_prompt(f"PersonX buys a car {i}", "xWant"),
                 "references": "to drive it", "reward_components": {"p_valid_model": 0.5, "final_reward": 0.5}}
                for i in range(n)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert _train(["-i", str(data), "-tn", "COMET", "-m", models["policy"], "-o", str(out), "-algo", "nll",
                   "-ccm", comet_critic["dir"]]) == 0
    assert "p_valid_model" in json.loads((out / "eval_results.json").read_text())["test/generated"]
    period = AutoTokenizer.from_pretrained(models["policy"])(".", add_special_tokens=False)["input_ids"]
    assert json.loads((out / "args.json").read_text())["generation"]["stop_token_ids"] == period
    # the engine applies the task's settings: a seeded random sample of 10,000 val rows, as the original
    from lolrl.engine.trainer import OfflineRLTrainer

    config = OfflineRLConfig(model_name=models["policy"], output_dir=str(tmp_path / "sample"), task_name="comet",
                             do_train=False, do_predict=False)
    val = load_jsonl(data / "val.jsonl")
    trainer = OfflineRLTrainer(args=config, data=TaskData(train=[], val=val * 3000, test=None), task=task_info("comet"),
                               reward=None)
    assert len(trainer.data.val) == 10000
    assert trainer.args.generation.stop_token_ids == period


def test_paper_task_without_tfidf_is_a_one_line_error(reddit_dir, models, tmp_path, capsys):
    from lolrl.tasks.paper.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for name in ("pos_train.jsonl", "val.jsonl", "test.jsonl"):
        (data / name).write_text((reddit_dir[1] / name).read_text())
    assert main(["-i", str(data), "-tn", "reddit_pos", "-m", models["policy"], "-o", str(tmp_path / "o"),
                 "-om", models["offensive"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task 'reddit_pos': built-in reward recipe: TF-IDF file")
    assert len(err.splitlines()) == 1
    assert err.endswith("(or pass --reward SPEC)")
