"""``lolrl demo`` (``demo.py``): the whole A-LoL pipeline offline, in minutes.

    lolrl demo --output_dir runs/demo

Builds the embedded task (short dialogues, half of the training responses poor), a tiny model
trained from scratch (or SmolLM2-135M with --model smollm2), the NLL reference, then A-LoL and
the baselines, and writes results.csv and rewards.png.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lolrl.demo.pipeline import DemoSettings, parse_variant, run_demo
from lolrl.engine.losses import ALGORITHMS
from lolrl.utils.cli import DataclassParser, setting
from lolrl.utils.errors import ConfigError, report_user_error
from lolrl.utils.logs import setup_logging

RL_ALGORITHMS = [a for a in ALGORITHMS if a != "nll"]


@dataclass
class DemoArguments:
    """The demo's settings."""

    output_dir: str = setting("runs/demo", "where the runs, results.csv and rewards.png go")
    model: str = setting("tiny", "a tiny model trained from scratch, or SmolLM2-135M", choices=("tiny", "smollm2"))
    algorithms: str = setting("a_lol,wbc", f"comma-separated, from {','.join(RL_ALGORITHMS)}; NAME+kK fits V(x) to "
                              "the mean reward of K samples per validation prompt (e.g. a_lol+k4), NAME+ridge "
                              "uses the ridge value head")
    seeds: str = setting("0", "comma-separated seeds, e.g. 0,1,2")
    n_train: int | None = setting(None, "training rows (default per model)", min=1)
    max_steps: int | None = setting(None, "cap optimizer steps per run (quick runs)", min=1)

    def __post_init__(self) -> None:
        try:
            unknown = [a for a in self.algorithms.split(",") if a and parse_variant(a)[0] not in RL_ALGORITHMS]
        except ValueError as exc:
            raise ConfigError(f"argument --algorithms: {exc}") from None
        if unknown:
            raise ConfigError(f"argument --algorithms: unknown algorithm(s) {', '.join(unknown)} "
                              f"(expected some of {', '.join(RL_ALGORITHMS)})")


def main(argv=None) -> int:
    args = DataclassParser(DemoArguments, description=__doc__).parse_one(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging(level=logging.WARNING)
    settings = DemoSettings.smollm2() if args.model == "smollm2" else DemoSettings()
    if args.n_train:
        settings.n_train = args.n_train
    if args.max_steps:
        settings.max_steps = args.max_steps
    try:
        run_demo(args.output_dir, [a for a in args.algorithms.split(",") if a],
                 [int(s) for s in args.seeds.split(",")], settings)
    except ConfigError as exc:
        return report_user_error(exc)
    return 0
