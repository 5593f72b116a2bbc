"""The ``lolrl`` command: one entry for every stage of the pipeline, as ``trl sft`` or ``tune run``.

    lolrl --help                     the stages
    lolrl train --help               a stage's own flags (and --config FILE.yaml)
    lolrl hh a-lol --algorithm a_lol --output_dir results/a_lol

Each stage is the function the original script of the same job runs (the root scripts are shims of
it), imported only when that stage runs, so ``lolrl --help`` is quick.
"""
from __future__ import annotations

import importlib
import sys

# stage -> (module:function, the original script it is, what it does); groups hold stages
STAGES: dict[str, tuple[str, str, str] | dict[str, tuple[str, str, str]]] = {
    "train": ("lolrl.tasks.paper.cli:main", "train_generation_task_with_off_policy_PG.py",
              "offline RL (A-LoL and its baselines) on a task folder of prompt/response/reward rows"),
    "hh": {
        "a-lol": ("lolrl.tasks.hh.offline:alol_main", "lolrl_qlora_llama_hh.py",
                  "the A-LoL family and its baselines on Helpful-and-Harmless"),
        "pro": ("lolrl.tasks.hh.offline:pro_main", "pro_qlora_llama_hh.py", "PRO on Helpful-and-Harmless"),
        "dpo": ("lolrl.tasks.hh.dpo:main", "dpo_qlora_llama_hh.py", "DPO (TRL's trainer) on Helpful-and-Harmless"),
        "ppo": ("lolrl.tasks.hh.online:main", "ppo_qlora_llama_hh.py",
                "online PPO (or TRL's GRPO / RLOO) on Helpful-and-Harmless"),
        "eval": ("lolrl.tasks.hh.evaluate:adapter_main", "qlora_llama_hh_eval.py",
                 "a base model + adapter on the HH test splits, scored by the test reward model"),
        "eval-full-model": ("lolrl.tasks.hh.evaluate:full_model_main", "ppo_hh_eval.py",
                            "a full causal LM (e.g. a released PPO checkpoint) on the HH test splits"),
    },
    "preprocess": {
        "reddit": ("lolrl.tasks.paper.preprocess:reddit_main", "preprocess_reddit_comment_scores_and_add_rewards.py",
                   "Reddit comment scores -> rewarded reddit_pos / reddit_neg rows"),
        "wow": ("lolrl.tasks.paper.preprocess:dialogue_main", "preprocess_wow_and_add_rewards.py",
                "Wizard of Wikipedia / FaithDial -> rewarded wow, faithdial, faithdial_wow rows"),
        "comet": ("lolrl.tasks.paper.preprocess:comet_main", "preprocess_comet_and_add_rewards.py",
                  "ATOMIC-10x / ATOMIC-2020 -> rewarded COMET rows"),
    },
    "aggregate": ("lolrl.tasks.paper.aggregate:main", "aggregate_generation_task_results.py",
                  "every run of a task in one table (CSV and markdown)"),
    "demo": ("lolrl.demo.cli:main", "demo.py", "the whole pipeline offline on the embedded task, in minutes"),
    "convert-comet": ("lolrl.tasks.paper.comet_convert:main", "convert_keras_roberta_to_huggingface.py",
                      "the Keras COMET critic -> a RoBERTa folder"),
    "clean-hh": ("lolrl.tasks.hh.cleaning:main", "data_cleaning.py", "drop cut-off HH training records"),
}


def _listing(stages: dict, prefix: str = "") -> list[str]:
    lines = []
    for name, entry in stages.items():
        if isinstance(entry, dict):
            lines += _listing(entry, f"{prefix}{name} ")
        else:
            lines.append(f"  {prefix + name:<22} {entry[2]} ({entry[1]})")
    return lines


def usage() -> str:
    return ("usage: lolrl STAGE [SUBSTAGE] [--config FILE.yaml] [flags ...]   (lolrl STAGE --help: its flags)\n\n"
            "stages (the original script of each in brackets):\n" + "\n".join(_listing(STAGES)) + "\n")


def entry(*words: str):
    """The function a stage runs: ``entry("hh", "a-lol")``."""
    node: dict | tuple = STAGES
    for word in words:
        node = node[word]
    module, function = node[0].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    node: dict | tuple = STAGES
    words: list[str] = []
    while isinstance(node, dict):
        if not argv or argv[0] in ("-h", "--help"):
            print(usage() if not words else f"usage: lolrl {' '.join(words)} SUBSTAGE ...\n\nsubstages:\n"
                  + "\n".join(_listing(node, " ".join(words) + " ")))
            return 0 if argv else 2
        if argv[0] not in node:
            where = f"lolrl {' '.join(words)}".strip()
            print(f"error: {where}: unknown stage '{argv[0]}' (expected one of {', '.join(node)}; see {where} --help)",
                  file=sys.stderr)
            return 2
        words.append(argv.pop(0))
        node = node[words[-1]]
    sys.argv[0] = f"lolrl {' '.join(words)}"  # the stage's --help and errors name the command
    return entry(*words)(argv)
