"""The HH offline runs on lolrl's engine: the A-LoL family and its baselines (``lolrl hh a-lol``, the original
``lolrl_qlora_llama_hh.py``) and PRO (``lolrl hh pro``, ``pro_qlora_llama_hh.py``)."""
from __future__ import annotations

from lolrl.engine.data import TaskData
from lolrl.tasks.hh.cli import ALoLHHConfig, ALoLHHData, HHData, HHOfflineConfig, PROHHConfig, PROHHData, parse_hh
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.shared import hh_postprocess, read_hh_files, validation_records, validation_reward
from lolrl.utils.errors import UserError, report_user_error
from lolrl.utils.logs import setup_logging

ALOL_HELP = """A-LoL and its baselines on Helpful-and-Harmless with a (Q)LoRA LLaMA, the original's options.

    lolrl hh a-lol --algorithm a_lol --sampling_strategy good_priority --output_dir results/a_lol

Training data: PRO-format ``{train_file_path}/cleaner_train.json`` (run ``lolrl clean-hh`` first);
validation: ``sampled_dev.json``, generated greedily and scored by the 1.4B OpenAssistant reward
model; the best adapter by validation reward goes to ``OUTPUT/best_adapter``. 4-bit NF4 base on
CUDA; plain LoRA in fp32 without CUDA (it says so). One GPU is enough: the reference is the
starting adapter, whose log-probs are computed once before training."""

PRO_HELP = """PRO (Preference Ranking Optimization) on Helpful-and-Harmless with a (Q)LoRA LLaMA.

    lolrl hh pro --output_dir results/pro

Each training item is one prompt with its first ``--training_stage_num`` candidate responses; the
loss (``lolrl.engine.losses.pro_loss``) ranks them by their raw stored reward-model logits, using the
length-normalised log-probability of each, plus ``--sft_weight`` x the summed NLL of the
``sft_index`` response. Same engine, validation, best adapter and checkpoints as ``lolrl hh a-lol``.
Differences from the original (documented in docs/hh.md): the candidates are ranked by reward inside
the loss (the original flipped the preference when a file was not sorted) and the score counts exactly
the response tokens (the original's mask was off by one)."""


def alol_data(data_args: ALoLHHData, config: ALoLHHConfig, train_rows, dev_rows) -> TaskData:
    """The A-LoL run's records; the original rescales the A-LoL family's step budget by the positive share."""
    if config.algorithm.startswith("a_lol"):
        config.step_scale_rows = len(train_rows)
    train = pro_records(train_rows, data_args.prompt_format, config.train_candidates, "train")
    value_reward = "mean" if config.value_fit_source == "data" else "sft"
    return TaskData(train=train, val=validation_records(data_args, dev_rows, value_reward), test=None)


def pro_data(data_args: PROHHData, config: PROHHConfig, train_rows, dev_rows) -> TaskData:
    """PRO's groups: each record's first ``group_size`` candidates, ranked by their raw stored rewards."""
    train = pro_records(train_rows, data_args.prompt_format, "all", "train", sigmoid_rewards=False,
                        n_candidates=config.group_size)
    return TaskData(train=train, val=validation_records(data_args, dev_rows), test=None)


def run_offline(data_args: HHData, config: HHOfflineConfig, build) -> int:
    """Read the data, build the run's ``TaskData`` with ``build(data_args, config, train_rows, dev_rows)``, train on
    the engine with the HH validation reward; user errors end in one line and exit status 2."""
    from lolrl.engine.trainer import OfflineRLTrainer  # transformers, when a run starts (--help stays quick)

    setup_logging(config.output_dir)
    try:
        train_rows, dev_rows = read_hh_files(data_args)
        data = build(data_args, config, train_rows, dev_rows)
        reward = validation_reward(config.reward, data_args.reward_model, config.per_device_eval_batch_size)
        trainer = OfflineRLTrainer(args=config, data=data, reward=reward, postprocess=hh_postprocess(data_args))
        results = trainer.run()
    except UserError as exc:
        return report_user_error(exc)
    if results:
        reward = results["val/generated"].get("final_reward")
        print((f"validation reward of the best adapter: {reward:.4f}; " if reward is not None else "")
              + f"adapter in {config.save_dir}")
    return 0


def alol_main(argv: list[str] | None = None) -> int:
    return run_offline(*parse_hh((ALoLHHData, ALoLHHConfig), argv, ALOL_HELP), alol_data)


def pro_main(argv: list[str] | None = None) -> int:
    return run_offline(*parse_hh((PROHHData, PROHHConfig), argv, PRO_HELP), pro_data)
