"""Preprocessing of the paper's small-model tasks: read raw data, score every reference, write splits.

The three top-level scripts (``preprocess_reddit_comment_scores_and_add_rewards.py``,
``preprocess_wow_and_add_rewards.py``, ``preprocess_comet_and_add_rewards.py``) parse the
original's flags and call :func:`preprocess_reddit`, :func:`preprocess_dialogue` or
:func:`preprocess_comet`. Every output file is written atomically; ``output.log`` records counts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lolrl.engine.reports import pyplot, save_figure
from lolrl.engine.rewards import RewardFunction
from lolrl.tasks.paper.data import (
    ATOMIC10X_FILE,
    ATOMIC2020_TEST_FILE,
    REDDIT_FILES,
    REDDIT_HELD_OUT,
    REDDIT_SAMPLE_SIZE,
    atomic10x_records,
    best_tail_records,
    dialogue_splits,
    read_atomic10x,
    read_atomic2020_test,
    read_faithdial_split,
    read_reddit_csv,
    read_wow_split,
    reddit_records,
    sample_rows,
    split_reddit,
)
from lolrl.tasks.paper.rewards import (
    DEFAULT_MODELS,
    EOS,
    TFIDF_FILE,
    CometCritic,
    PaperRewardModels,
    TfidfScorer,
    build_task_reward,
    task_reward_components,
)
from lolrl.utils.cli import DataclassParser, setting
from lolrl.utils.errors import UserError, report_user_error
from lolrl.utils.io import atomic_write_json, write_jsonl

logger = logging.getLogger("lolrl.preprocess")


class PreprocessError(UserError):
    """A problem with the flags or the tokenizer, reported as one line."""


def setup_logging(output_dir: str | Path) -> None:
    """Log to stderr and ``OUTPUT/output.log`` (replacing handlers of an earlier call)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for handler in [h for h in logger.handlers if getattr(h, "_lolrl", False)]:
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s [%(levelname)s] %(message)s")
    for handler in (logging.StreamHandler(), logging.FileHandler(output_dir / "output.log", mode="w")):
        handler._lolrl = True
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def load_policy_tokenizer(name: str):
    """The ``-m`` tokenizer (length filters); it must read ``<|endoftext|>`` as its EOS, as GPT-2's does."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise PreprocessError(f"-m {name!r}: cannot load the tokenizer ({str(exc).strip().splitlines()[0]})") from None
    if tokenizer.eos_token != EOS:
        raise PreprocessError(f"-m {name!r}: these tasks' data uses GPT-2's end-of-text {EOS!r}, the tokenizer's "
                              f"EOS is {tokenizer.eos_token!r}")
    return tokenizer


def score_records(records: list[dict], reward: RewardFunction, batch_size: int, desc: str) -> list[dict]:
    """Add ``reward_components`` (every component, then ``final_reward`` = their sum) to each record.

    The reward sees exactly what the trainer will pass it: the prompt, the reference (its trailing
    EOS is removed by each component) and the ``meta_data`` fields as columns."""
    if not records:
        return records
    keys: list[str] = []
    for record in records:
        keys += [k for k in record.get("meta_data", {}) if k not in keys]
    columns = {k: [r.get("meta_data", {}).get(k) for r in records] for k in keys}
    columns["ids"] = [str(r["id"]) for r in records]
    columns["references"] = [r["references"] for r in records]
    scores = reward(prompts=[r["prompt_or_input_text"] for r in records],
                    completions=[r["references"] for r in records], batch_size=batch_size, desc=desc, **columns)
    for i, record in enumerate(records):
        record["reward_components"] = {name: values[i] for name, values in scores.items()}
    return records


def plot_components(records: list[dict], out_png: Path, title: str) -> Path | None:
    """One violin per reward component (the original's per_component_reward_distribution_plot_*.png)."""
    if not records:
        return None
    names = list(records[0]["reward_components"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    values = [[r["reward_components"][n] for r in records] for n in names]
    if len(records) > 1:
        ax.violinplot(values, showmeans=True)
    else:
        ax.scatter(range(1, len(names) + 1), [v[0] for v in values])
    ax.set_xticks(range(1, len(names) + 1))
    ax.set_xticklabels(names)
    ax.set_title(f"{title} ({len(records)} records)")
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out_png)


def write_split(output_dir: Path, name: str, records: list[dict], plot_name: str) -> None:
    write_jsonl(output_dir / name, records)
    plot_components(records, output_dir / f"per_component_reward_distribution_plot_{plot_name}.png", plot_name)
    if records:
        means = {k: sum(r["reward_components"][k] for r in records) / len(records)
                 for k in records[0]["reward_components"]}
        logger.info("wrote %d records to %s; mean rewards %s", len(records), output_dir / name,
                    {k: round(v, 4) for k, v in means.items()})
    else:
        logger.warning("wrote 0 records to %s", output_dir / name)


# ----------------------------------------------------------------------------- Reddit
def preprocess_reddit(args: RedditArguments) -> dict:
    """Kaggle CSVs -> test.jsonl, val.jsonl (joint positive + negative), pos_train.jsonl, neg_train.jsonl."""
    out = Path(args.output_dir)
    setup_logging(out)
    started = time.time()
    tokenizer = load_policy_tokenizer(args.model_name)
    models = PaperRewardModels.from_args(args, batch_size=args.batch_size)
    task_reward_components("reddit_pos", models, TfidfScorer({}))  # check the model flags before reading data
    splits, counts = {}, {}
    for kind, filename in REDDIT_FILES.items():
        rows = read_reddit_csv(Path(args.input_dir) / filename)
        sampled = sample_rows(rows, args.sample_size)
        if len(rows) < args.sample_size:
            logger.warning("%s: %d rows with text and parent_text, fewer than the sample size %d: all are used",
                           filename, len(rows), args.sample_size)
        stats: dict = {}
        records = reddit_records(sampled, tokenizer, stats)
        splits[kind] = split_reddit(records, args.held_out)
        counts[kind] = {"rows": len(rows), "sampled": len(sampled), "kept": len(records), **stats,
                        "test": len(splits[kind][0]), "val": len(splits[kind][1]), "train": len(splits[kind][2])}
        logger.info("%s: %s", filename, counts[kind])
        if args.plot_violin_distribution:
            _plot_scores([r["score"] for r in rows], out / f"{kind}_comments_score_distribution.png",
                         f"{kind} comments score distribution ({len(rows)} instances)")
    train_refs = [r["references"] for r in splits["positive"][2] + splits["negative"][2]]
    tfidf = TfidfScorer.fit(train_refs)  # fitted without the EOS (the original kept '<|endoftext|>' in)
    tfidf.save(out / TFIDF_FILE)
    logger.info("TF-IDF fitted on %d train references: %d terms", len(train_refs), len(tfidf.idf))
    reward = build_task_reward("reddit_pos", models, tfidf)
    outputs = {"test.jsonl": ("test", splits["positive"][0] + splits["negative"][0]),
               "val.jsonl": ("val", splits["positive"][1] + splits["negative"][1]),
               "pos_train.jsonl": ("pos_train", splits["positive"][2]),
               "neg_train.jsonl": ("neg_train", splits["negative"][2])}
    for name, (segment, records) in outputs.items():
        score_records(records, reward, args.batch_size, f"rewards {segment}")
        if records:
            agree = sum((r["meta_data"]["score"] > 0) == (r["reward_components"]["updown"] >= 0.5) for r in records)
            logger.info("%s: updown accuracy (sign of score vs updown >= 0.5) %d/%d = %.2f%%", segment, agree,
                        len(records), 100 * agree / len(records))
        write_split(out, name, records, segment)
    summary = {"counts": counts, "files": {k: len(v[1]) for k, v in outputs.items()}, "models": models.as_dict(),
               "seconds": round(time.time() - started, 1)}
    atomic_write_json(out / "preprocess_summary.json", summary)
    return summary


def _plot_scores(scores: list[float], out_png: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    if len(scores) > 1:
        ax.violinplot([scores], orientation="horizontal", showmedians=True)
    ax.set_xlabel("score")
    ax.set_title(title)
    save_figure(fig, out_png)


# ----------------------------------------------------------------------------- WoW / FaithDial
def preprocess_dialogue(args: DialogueArguments) -> dict:
    """WoW / FaithDial -> train.jsonl, val.jsonl and test.jsonl (``faithdial_test.jsonl`` for wow)."""
    variant = args.input_task.lower()
    out = Path(args.output_dir)
    setup_logging(out)
    started = time.time()
    tokenizer = load_policy_tokenizer(args.model_name)
    models = PaperRewardModels.from_args(args, batch_size=args.batch_size)
    task_reward_components(variant, models, TfidfScorer({}))  # check the model flags before reading data
    need_wow = variant in ("wow", "faithdial_wow")
    wow = {s: read_wow_split(args.wow_dir, s) for s in ("train", "val")} if need_wow else {}
    faithdial_splits = ("test",) if variant == "wow" else ("train", "val", "test")
    faithdial = {s: read_faithdial_split(args.faithdial_dir, s) for s in faithdial_splits}
    counts = {f"wow_{k}": len(v) for k, v in wow.items()} | {f"faithdial_{k}": len(v) for k, v in faithdial.items()}
    logger.info("examples: %s", counts)
    files = dialogue_splits(variant, wow, faithdial, tokenizer)
    # Fix: the TF-IDF is fitted on this task's own training responses (the original always used WoW's)
    tfidf = TfidfScorer.fit([r["references"] for r in files["train.jsonl"]])
    tfidf.save(out / TFIDF_FILE)
    logger.info("TF-IDF fitted on %d train references: %d terms", len(files["train.jsonl"]), len(tfidf.idf))
    reward = build_task_reward(variant, models, tfidf)
    for name, records in files.items():
        segment = name[:-len(".jsonl")]
        write_split(out, name, score_records(records, reward, args.batch_size, f"rewards {segment}"), segment)
    summary = {"task": variant, "counts": counts, "files": {k: len(v) for k, v in files.items()},
               "models": models.as_dict(), "seconds": round(time.time() - started, 1)}
    atomic_write_json(out / "preprocess_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- COMET
def preprocess_comet(args: CometArguments) -> dict:
    """ATOMIC-10x -> train / val / test_atomic10x (stored critic scores); ATOMIC-2020 test -> test.jsonl
    (every triple scored by the converted critic, the best tail per (head, relation) kept)."""
    out = Path(args.output_dir)
    setup_logging(out)
    started = time.time()
    models = PaperRewardModels.from_args(args, batch_size=args.batch_size)
    critic = CometCritic(models.comet_critic, device=models.device, batch_size=args.batch_size)
    atomic10x = read_atomic10x(Path(args.input_dir) / ATOMIC10X_FILE)
    triples = read_atomic2020_test(Path(args.input_test_dir) / ATOMIC2020_TEST_FILE)
    counts = {f"atomic10x_{k}": len(v) for k, v in atomic10x.items()} | {"atomic2020_test_triples": len(triples)}
    logger.info("rows: %s", counts)
    records, skipped = atomic10x_records(atomic10x["test"])
    write_split(out, "test_atomic10x.jsonl", records, "test_atomic10x")
    logger.info("scoring %d ATOMIC-2020 test triples with the critic %s", len(triples), models.comet_critic)
    scores = critic.score_triples(triples) if triples else []
    test = best_tail_records(triples, scores)
    write_split(out, "test.jsonl", test, "test")
    files = {"test_atomic10x.jsonl": len(records), "test.jsonl": len(test)}
    for split in ("val", "train"):
        records, n_skipped = atomic10x_records(atomic10x[split])
        skipped += n_skipped
        write_split(out, f"{split}.jsonl", records, split)
        files[f"{split}.jsonl"] = len(records)
    if skipped:
        logger.warning("skipped %d ATOMIC-10x rows with an empty tail", skipped)
    summary = {"counts": counts, "files": files, "skipped_empty_tails": skipped, "models": models.as_dict(),
               "seconds": round(time.time() - started, 1)}
    atomic_write_json(out / "preprocess_summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- command lines
_MODEL_FLAGS = {"cola": ("-cm", "cola_classifier_model", "CoLA classifier (fluency)"),
                "depth": ("-dcm", "depth_dialogRPT_model", "DialogRPT-depth (depth)"),
                "updown": ("-ucm", "updown_dialogRPT_model", "DialogRPT-updown (updown)"),
                "offensive": ("-om", "offensive_model_dir", "ToxiChat offensive classifier folder (safe)"),
                "faithcritic": ("-fcm", "faithdial_critic_model", "FaithCritic (faithdial)"),
                "comet_critic": ("-ccm", "comet_critic_model", "converted COMET critic folder (p_valid_model)")}


def _model(key: str):
    """One of the original's classifier flags, defaulting (None) to the README's model."""
    short, _, what = _MODEL_FLAGS[key]
    return setting(None, f"{what}: hub id or path (default {DEFAULT_MODELS[key]})", aliases=[short])


def run_main(fn, parser: DataclassParser, argv: list[str] | None) -> int:
    """Parse, run, and turn input errors into one line on stderr with status 2."""
    args = parser.parse_one(argv)
    try:
        summary = fn(args)
    except UserError as exc:
        return report_user_error(exc)
    print(f"wrote {summary['files']} to {Path(args.output_dir).resolve()}")
    return 0


@dataclass(kw_only=True)
class _DialogueDataArguments:
    """The flags the Reddit and the knowledge-grounded dialogue preprocessing share."""

    output_dir: str = setting(help="where the .jsonl files, TF-IDF weights, plots and log go", aliases=["-o"])
    model_name: str = setting(help="policy tokenizer for the history length filter (DialoGPT)", aliases=["-m"])
    plot_violin_distribution: bool = setting(False, "also plot the score distributions (Reddit only)",
                                             aliases=["-pd"])
    cola_classifier_model: str | None = _model("cola")
    depth_dialogRPT_model: str | None = _model("depth")
    batch_size: int = setting(32, "batch size of the reward models", aliases=["-bs"], min=1)


@dataclass(kw_only=True)
class RedditArguments(_DialogueDataArguments):
    """Reddit comment scores (Kaggle) -> rewarded reddit_pos / reddit_neg records."""

    input_dir: str = setting(help="folder with comments_positive.csv and comments_negative.csv", aliases=["-i"])
    updown_dialogRPT_model: str | None = _model("updown")
    offensive_model_dir: str | None = _model("offensive")
    sample_size: int = setting(REDDIT_SAMPLE_SIZE, "rows sampled per file before filtering", min=1)
    held_out: int = setting(REDDIT_HELD_OUT, "test rows (the first ones) and val rows (the next ones) per file; "
                                             "the rest is train", min=1)


@dataclass(kw_only=True)
class DialogueArguments(_DialogueDataArguments):
    """Wizard of Wikipedia / FaithDial -> rewarded knowledge-grounded dialogue records."""

    input_task: str = setting(help="which task to build: wow, faithdial or faithdial_wow (any case)", aliases=["-i"])
    faithdial_critic_model: str | None = _model("faithcritic")
    wow_dir: str = setting("data/wow", "Wizard of Wikipedia folder (train.json, valid_topic_split.json); the "
                                       "original's fixed path")
    faithdial_dir: str | None = setting(None, "FaithDial folder (train.json, valid.json, test.json); default: the "
                                              "McGill-NLP/FaithDial hub dataset, as the original")

    def __post_init__(self) -> None:
        self.input_task = self.input_task.lower()
        if self.input_task not in ("wow", "faithdial", "faithdial_wow"):
            raise UserError(f"argument --input_task/-i: expected one of wow, faithdial, faithdial_wow, "
                            f"got '{self.input_task}'")


@dataclass
class CometArguments:
    """ATOMIC-10x / ATOMIC-2020 -> rewarded COMET records."""

    input_dir: str = setting(help="folder with ATOMIC10X.jsonl (the SKD release's downloaded/)", aliases=["-i"])
    input_test_dir: str = setting(help="folder with ATOMIC-2020's test.tsv", aliases=["-it", "--atomic2020_dir"])
    output_dir: str = setting(help="where the records go", aliases=["-o"])
    comet_critic_model: str | None = _model("comet_critic")
    batch_size: int = setting(32, "batch size of the critic", aliases=["-bs"], min=1)


def reddit_parser() -> DataclassParser:
    return DataclassParser(RedditArguments, description=RedditArguments.__doc__)


def dialogue_parser() -> DataclassParser:
    return DataclassParser(DialogueArguments, description=DialogueArguments.__doc__)


def comet_parser() -> DataclassParser:
    return DataclassParser(CometArguments, description=CometArguments.__doc__)


def reddit_main(argv: list[str] | None = None) -> int:
    """``lolrl preprocess reddit`` (preprocess_reddit_comment_scores_and_add_rewards.py)."""
    return run_main(preprocess_reddit, reddit_parser(), argv)


def dialogue_main(argv: list[str] | None = None) -> int:
    """``lolrl preprocess wow`` (preprocess_wow_and_add_rewards.py): wow, faithdial, faithdial_wow."""
    return run_main(preprocess_dialogue, dialogue_parser(), argv)


def comet_main(argv: list[str] | None = None) -> int:
    """``lolrl preprocess comet`` (preprocess_comet_and_add_rewards.py)."""
    return run_main(preprocess_comet, comet_parser(), argv)
