"""Task names: the paper's tasks (with their file names and model-selection measure) and any other.

The names are one consistent lower-case set; the original's spellings are accepted as aliases.
A task the library does not know is fine as long as a reward is given with ``--reward``.
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


PAPER_TASKS = {
    "reddit_pos": TaskInfo("reddit_pos", {"train": "pos_train.jsonl"}, "final_reward", 5.0,
                           ("fluency", "depth", "updown", "safe", "tfidf")),
    "reddit_neg": TaskInfo("reddit_neg", {"train": "neg_train.jsonl"}, "final_reward", 5.0,
                           ("fluency", "depth", "updown", "safe", "tfidf")),
    "wow": TaskInfo("wow", {"test": "faithdial_test.jsonl"}, "faithdial", 4.0, ("fluency", "faithdial", "depth", "tfidf")),
    "faithdial": TaskInfo("faithdial", {}, "final_reward", 4.0, ("fluency", "faithdial", "depth", "tfidf")),
    "faithdial_wow": TaskInfo("faithdial_wow", {}, "faithdial", 4.0, ("fluency", "faithdial", "depth", "tfidf")),
    "comet": TaskInfo("comet", {}, "p_valid_model", 1.0, ("p_valid_model",)),
}
ALIASES = {"WOW": "wow", "COMET": "comet"}


def task_info(name: str | None) -> TaskInfo:
    """The paper task of that name (case-insensitive), or a generic task."""
    if not name:
        return TaskInfo("custom")
    key = ALIASES.get(name, name.lower())
    return PAPER_TASKS.get(key, TaskInfo(name))


def is_paper_task(name: str | None) -> bool:
    return bool(name) and ALIASES.get(name, name.lower()) in PAPER_TASKS
