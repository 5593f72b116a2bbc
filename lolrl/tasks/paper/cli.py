"""Command line of ``train_generation_task_with_off_policy_PG.py``: the task's data and reward models
(:class:`GenerationTaskArguments`) and the engine's config with the original's meaning (:class:`PaperRLConfig`),
the original's flags as aliases of the config's fields (``-bs`` is ``--per_device_train_batch_size``).

Everything is parsed and checked (flags, data files, reward spec) before any model loads; a
problem prints one line and exits with status 2.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lolrl.engine.config import ConfigError, OfflineRLConfig
from lolrl.engine.data import load_task_dir
from lolrl.engine.rewards import RewardSpecError, load_reward
from lolrl.tasks.paper.tasks import is_paper_task, task_info
from lolrl.utils.cli import DataclassParser, ignored, restated, setting
from lolrl.utils.errors import UserError, report_user_error
from lolrl.utils.logs import setup_logging

logger = logging.getLogger("lolrl")


TASK_HELP = ("task name; a paper task (reddit_pos, reddit_neg, wow, faithdial, faithdial_wow, COMET; any case), "
             "scored by its built-in reward recipe unless --reward is given, or any name together with --reward")


def _model_flag(short: str, key: str | None) -> Any:
    from lolrl.tasks.paper.rewards import DEFAULT_MODELS

    return setting(None, f"default {DEFAULT_MODELS[key]}" if key else "unused by these tasks (accepted)",
                   aliases=[short])


@dataclass
class GenerationTaskArguments:
    """The task's data and reward models (the training settings are PaperRLConfig's)."""

    input_dir: str = setting(help="folder with train.jsonl, val.jsonl, test.jsonl", aliases=["-i"])
    use_datasets: bool = setting(False, "read the JSON Lines files through `datasets`")
    reward_function: str | None = ignored(None, "parsed, never read by the original", aliases=["-r"])
    baseline_update_threshold: float | None = setting(None, "refused: the reference policy stays fixed, as in the "
                                                            "paper's objective", aliases=["-but"])
    # paper reward models: the paper tasks' built-in reward recipes read their classifiers from these
    cola_classifier_model: str | None = _model_flag("-cm", "cola")
    embedding_similarity_model: str | None = _model_flag("-esm", None)
    sentiment_classification_model: str | None = _model_flag("-scm", None)
    doc_nli_model: str | None = _model_flag("-dnlim", None)
    comet_critic_model: str | None = _model_flag("-ccm", "comet_critic")
    faithdial_critic_model: str | None = _model_flag("-fcm", "faithcritic")
    depth_dialogRPT_model: str | None = _model_flag("-dcm", "depth")
    updown_dialogRPT_model: str | None = _model_flag("-ucm", "updown")
    offensive_model_dir: str | None = _model_flag("-om", "offensive")

    def __post_init__(self) -> None:
        if self.baseline_update_threshold is not None:
            raise ConfigError("--baseline_update_threshold is not supported: the reference policy stays fixed, "
                              "as in the paper's objective")


@dataclass
class PaperRLConfig(OfflineRLConfig):
    """The engine's settings with the original script's meaning: -m, -tn and -o are required; -t trains
    (without it the model at -s, if that folder exists, else -m, is evaluated); the task's name in any case."""

    output_dir: str | None = restated(OfflineRLConfig, "output_dir", None, required=True)
    model_name: str | None = restated(OfflineRLConfig, "model_name", None, "an NLL-trained model", required=True)
    task_name: str | None = restated(OfflineRLConfig, "task_name", None, TASK_HELP, required=True)
    do_train: bool = restated(OfflineRLConfig, "do_train", False, "without -t only the model is evaluated (the "
                                                                  "one at -s if that folder exists, as the original)")

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = task_info(self.task_name).name
        if not self.do_train and self.save_dir and Path(self.save_dir).is_dir():
            self.model_name = self.save_dir  # the original evaluates the saved model when -t is absent
        super().__post_init__()


def build_parser() -> DataclassParser:
    return DataclassParser(GenerationTaskArguments, PaperRLConfig, description=__doc__)


def parse_args(argv: list[str] | None = None) -> tuple[GenerationTaskArguments, PaperRLConfig]:
    return build_parser().parse(argv)


def _check_reward_given(config: PaperRLConfig) -> None:
    if config.reward is not None or is_paper_task(config.task_name):
        return  # a paper task without --reward uses its built-in recipe
    raise ConfigError(f"task '{config.task_name}' is not a paper task: pass --reward SPEC "
                      "(or --reward none to select checkpoints by gold NLL)")


def _paper_task_reward(args: GenerationTaskArguments, config: PaperRLConfig):
    """The paper task's recipe (lolrl.tasks.paper.rewards), classifiers from -cm -ucm -dcm -om -fcm -ccm and the
    TF-IDF weights from the input folder; ``config.reward`` records its components."""
    from lolrl.tasks.paper.rewards import TFIDF_FILE, PaperRewardModels, build_task_reward

    models = PaperRewardModels.from_args(args, batch_size=config.per_device_eval_batch_size)
    try:
        reward = build_task_reward(config.task_name, models, Path(args.input_dir) / TFIDF_FILE
                                   if config.task_name != "comet" else None)
    except RewardSpecError as exc:
        raise RewardSpecError(f"task '{config.task_name}': built-in reward recipe: {exc} "
                              "(or pass --reward SPEC)") from None
    config.reward = " + ".join(f"{c.name}={c.source}" for c in reward.components)
    return reward


def run(args: GenerationTaskArguments, config: PaperRLConfig) -> tuple[dict, bool]:
    """Check everything cheap first (flags, reward spec, every data row), then load models and run."""
    _check_reward_given(config)
    task = task_info(config.task_name)
    data = load_task_dir(args.input_dir, task.split_files,
                         require_train_reward=config.do_train and config.algorithm != "nll",
                         need_test=config.do_predict, use_datasets=args.use_datasets)
    if config.reward is None and is_paper_task(config.task_name):
        reward = _paper_task_reward(args, config)
    else:
        reward = load_reward(config.reward) if config.reward not in (None, "none") else None
    from lolrl.engine.trainer import OfflineRLTrainer

    setup_logging(config.output_dir)  # before models load
    trainer = OfflineRLTrainer(args=config, data=data, reward=reward, task=task)
    return trainer.run(), trainer.is_main


def main(argv: list[str] | None = None) -> int:
    try:
        args, config = parse_args(argv)
        results, is_main = run(args, config)
    except UserError as exc:  # one line, status 2; anything else is a bug and keeps its traceback
        return report_user_error(exc)
    if is_main and results:
        from lolrl.engine.reports import format_markdown_table

        print(format_markdown_table(results))
        print(f"outputs in {Path(config.output_dir).resolve()}; best model in {Path(config.save_dir).resolve()}")
    return 0
