"""What the HH runs share: reading the data, the validation records and reward, generation and precision
settings (each function takes the run's data or training settings, :mod:`lolrl.tasks.hh.cli`). The runs:
:mod:`lolrl.tasks.hh.offline` (A-LoL family, PRO), :mod:`lolrl.tasks.hh.dpo`, :mod:`lolrl.tasks.hh.online` (PPO,
GRPO, RLOO) and :mod:`lolrl.tasks.hh.evaluate`.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from lolrl.engine.data import Record, TaskData
from lolrl.engine.generation import GenerationSettings
from lolrl.engine.rewards import RewardFunction
from lolrl.tasks.hh.data import postprocess, pro_records, read_pro_file, sigmoid, stop_ids

MAX_PROMPT_LENGTH, MAX_RESPONSE_LENGTH = 640, 128  # the original's limits (prompt left-truncated)


def adapter_of(args) -> str | None:
    return None if args.adapter_path in (None, "", "none", "None") else args.adapter_path


def read_hh_files(args) -> tuple[list[dict], list[dict]]:
    """The PRO-format training records (``cleaner_train.json``) and the validation records."""
    train = read_pro_file(Path(args.train_file_path) / "cleaner_train.json")
    train = train[: args.max_train_examples] if args.max_train_examples else train
    return train, read_pro_file(args.eval_file_path, allow_empty_suffix=True)


def validation_records(args, dev_rows: list[dict], reward: str = "sft") -> list[Record]:
    """One record per dev prompt (so each is generated and scored once), its gold response the
    ``sft_index`` suffix. Its reward: that suffix's stored reward (``"sft"``), or the mean stored reward
    of all its suffixes (``"mean"``: V(x)'s target with ``--value_source data``, the expected reward of
    the data's responses to the prompt; the minimiser of the squared error over every suffix)."""
    records = pro_records(dev_rows, args.prompt_format, "sft", "dev")
    if reward == "sft":
        return records
    if reward != "mean":
        raise ValueError(f"unknown validation reward '{reward}' (expected sft or mean)")
    return [dataclasses.replace(r, reward=float(np.mean([sigmoid(x) for x in row["reward"]])))
            for r, row in zip(records, dev_rows, strict=True)]


def hh_postprocess(args):
    anthropic = args.prompt_format == "anthropic"
    return lambda text: postprocess(text, anthropic)


def generation_settings(model_name: str) -> GenerationSettings:
    """Greedy, 128 new tokens, stop at EOS and at '###' (when it is one token, :func:`stop_ids`), as the
    original validates."""
    from lolrl.engine.modeling import load_tokenizer

    return GenerationSettings(max_new_tokens=MAX_RESPONSE_LENGTH, num_beams=1, repetition_penalty=1.0,
                              stop_token_ids=stop_ids(load_tokenizer(model_name)))


def validation_reward(spec: str | None, reward_model: str | None, batch_size: int) -> RewardFunction | None:
    """``--reward`` (a spec, or none), else the OpenAssistant-style ``--reward_model``."""
    from lolrl.engine.rewards import load_reward
    from lolrl.tasks.hh.reward_model import TRAINING_RM, HHRewardModel

    if spec is not None:
        return None if spec.lower() == "none" else load_reward(spec)
    return RewardFunction.from_callables({"reward": HHRewardModel(reward_model or TRAINING_RM, batch_size=batch_size)})


def precision(args) -> dict:
    """``load_model``'s (and the engine configs') precision settings: on CUDA a 4-bit base quantised as
    the script's quantisation flags say (by default the original's: NF4, no double quantisation, fp16
    compute, no ``prepare_model_for_kbit_training``) in a bf16 run; plain LoRA in fp32 elsewhere, and
    the log says so."""
    cuda = torch.cuda.is_available()
    if not cuda:
        logging.getLogger(__name__).warning("no CUDA device: plain LoRA on an fp32 base instead of 4-bit QLoRA")
    return {"dtype": "bf16" if cuda else "fp32", "load_in_4bit": cuda, "quantization": args.quantization}


def task_data(train, val) -> TaskData:
    return TaskData(train=train, val=val, test=None)
