"""Task names: the paper's tasks (with their file names and model-selection measure) and any other.

The names are one consistent set, matched case-insensitively: ``reddit_pos``, ``reddit_neg``,
``wow``, ``faithdial``, ``faithdial_wow``, ``comet`` (so the original's ``COMET`` and ``WOW``
work too). A paper task without ``--reward`` is scored by its built-in recipe
(:mod:`lolrl.tasks.paper.rewards`); any other name needs ``--reward``.
"""
from __future__ import annotations

from lolrl.engine.task import TaskInfo
from lolrl.tasks.paper.rewards import EOS, dialogue_knowledge

_KNOWLEDGE = dict(knowledge=dialogue_knowledge)  # coverage/density against the prompt's knowledge

PAPER_TASKS = {task.name: task for task in (
    TaskInfo("reddit_pos", {"train": "pos_train.jsonl"}, "final_reward", end_markers=(EOS,)),
    TaskInfo("reddit_neg", {"train": "neg_train.jsonl"}, "final_reward", end_markers=(EOS,)),
    TaskInfo("wow", {"test": "faithdial_test.jsonl"}, "faithdial", end_markers=(EOS,), **_KNOWLEDGE),
    TaskInfo("faithdial", {}, "final_reward", end_markers=(EOS,), **_KNOWLEDGE),
    TaskInfo("faithdial_wow", {}, "faithdial", end_markers=(EOS,), **_KNOWLEDGE),
    TaskInfo("comet", {}, "p_valid_model", val_sample=10000, stop_texts=(".",), end_markers=(EOS,)),
)}


def task_info(name: str | None) -> TaskInfo:
    """The paper task of that name (case-insensitive), or a generic task."""
    if not name:
        return TaskInfo("custom")
    return PAPER_TASKS.get(name.lower(), TaskInfo(name))


def is_paper_task(name: str | None) -> bool:
    return bool(name) and name.lower() in PAPER_TASKS
