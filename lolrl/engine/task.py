"""What the engine knows of a task: its description object.

The engine never imports a task family; a task (``lolrl.tasks.paper``, ``lolrl.tasks.hh``, your own)
describes itself with a :class:`TaskInfo` and hands it to the trainer.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskInfo:
    name: str = "custom"
    split_files: dict[str, str] = field(default_factory=dict)  # overrides of {split}.jsonl
    val_metric: str = "final_reward"  # which mean generated reward selects the best checkpoint
    val_sample: int | None = None  # the trainer validates on a seeded sample of this many val rows (COMET: 10,000)
    stop_texts: tuple[str, ...] = ()  # the trainer's generations also stop at these one-token texts (COMET: ".")
    end_markers: tuple[str, ...] = ()  # text markers removed from gold responses before comparing (besides EOS)
    knowledge: Callable[[str], str] | None = None  # prompt -> its knowledge text, for coverage/density metrics
