"""Task names: the paper's tasks (with their file names and model-selection measure) and any other.

The names are one consistent set, matched case-insensitively: ``reddit_pos``, ``reddit_neg``,
``wow``, ``faithdial``, ``faithdial_wow``, ``comet`` (so the original's ``COMET`` and ``WOW``
work too). A paper task without ``--reward`` is scored by its built-in recipe
(:mod:`lolrl.paper_rewards`); any other name needs ``--reward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskInfo:
    name: str
    split_files: dict[str, str] = field(default_factory=dict)  # overrides of {split}.jsonl
    val_metric: str = "final_reward"  # which mean generated reward selects the best checkpoint
    max_value: float | None = None  # upper bound of final_reward (number of [0, 1] components)
    components: tuple[str, ...] = ()
    val_sample: int | None = None  # validate on a seeded random sample of this many val rows (COMET: 10,000)
    stop_texts: tuple[str, ...] = ()  # generation also stops at these tokens (COMET: ".")
    knowledge_metrics: bool = False  # coverage/density of responses against the prompt's knowledge (dialogue tasks)


PAPER_TASKS = {
    "reddit_pos": TaskInfo("reddit_pos", {"train": "pos_train.jsonl"}, "final_reward", 5.0,
                           ("fluency", "depth", "updown", "safe", "tfidf")),
    "reddit_neg": TaskInfo("reddit_neg", {"train": "neg_train.jsonl"}, "final_reward", 5.0,
                           ("fluency", "depth", "updown", "safe", "tfidf")),
    "wow": TaskInfo("wow", {"test": "faithdial_test.jsonl"}, "faithdial", 4.0, ("fluency", "faithdial", "depth", "tfidf"),
                  knowledge_metrics=True),
    "faithdial": TaskInfo("faithdial", {}, "final_reward", 4.0, ("fluency", "faithdial", "depth", "tfidf"),
                  knowledge_metrics=True),
    "faithdial_wow": TaskInfo("faithdial_wow", {}, "faithdial", 4.0, ("fluency", "faithdial", "depth", "tfidf"),
                  knowledge_metrics=True),
    "comet": TaskInfo("comet", {}, "p_valid_model", 1.0, ("p_valid_model",), val_sample=10000, stop_texts=(".",)),
}


def task_info(name: str | None) -> TaskInfo:
    """The paper task of that name (case-insensitive), or a generic task."""
    if not name:
        return TaskInfo("custom")
    return PAPER_TASKS.get(name.lower(), TaskInfo(name))


def is_paper_task(name: str | None) -> bool:
    return bool(name) and name.lower() in PAPER_TASKS
