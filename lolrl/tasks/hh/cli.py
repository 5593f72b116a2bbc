"""The HH scripts' settings: one dataclass per script, generated into its command line.

:class:`HHArguments` holds every field of the original ``ScriptArguments`` that the HH scripts
share (``lolrl_qlora_llama_hh.py``, ``dpo_``, ``pro_``, ``ppo_qlora_llama_hh.py`` and the two
evaluation scripts), with the original's names, types and defaults; each script's subclass adds
its own fields and restates only the defaults that differ in the original script. A field the
original parsed but never read is accepted and labelled so in ``--help`` (:func:`ignored`).
Parsing: :class:`lolrl.utils.cli.DataclassParser` (``--flag False``, ``--no_flag``,
``--config FILE.yaml``, one-line errors with exit status 2).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from lolrl.engine.config import DISABLE_DROPOUT_HELP, OfflineRLConfig
from lolrl.engine.losses import ALGORITHMS, PPO_KL_PENALTIES
from lolrl.engine.model_card import HubSettings
from lolrl.engine.modeling import LOGPROB_KERNEL_HELP, LOGPROB_KERNELS, QuantizationSettings
from lolrl.engine.sampling import STRATEGIES as SAMPLING_STRATEGIES
from lolrl.tasks.hh.data import RENDERINGS
from lolrl.tasks.hh.preference import PAIR_ORDERS
from lolrl.tasks.hh.reward_model import TEST_RM
from lolrl.tasks.hh.train import MAX_PROMPT_LENGTH, hh_postprocess, read_hh_files, validation_reward
from lolrl.utils.cli import DataclassParser, default_of, ignored, restated, setting
from lolrl.utils.errors import ConfigError, UserError, report_user_error

logger = logging.getLogger(__name__)
HH_STRATEGIES = (*SAMPLING_STRATEGIES, "all_priority")
PPO_STEPS = 1000  # the original's --total_steps default


_Q = QuantizationSettings


@dataclass
class HHArguments(QuantizationSettings):
    """Settings every HH script shares (the original ScriptArguments' common fields)."""

    model_name_or_path: str = setting("huggyllama/llama-7b", "base model: hub id or path")
    adapter_path: str | None = setting("timdettmers/qlora-hh-rlhf-7b",
                                       "starting (and reference) adapter; 'none' trains a new LoRA adapter")
    # optimisation
    optim: str = setting("paged_adamw_32bit", "a transformers optimizer name; the bitsandbytes ones need CUDA and "
                                              "bitsandbytes (else adamw_torch, with a warning)")
    adam_beta1: float = setting(0.9, "Adam beta1")
    adam_beta2: float = setting(0.999, "Adam beta2")
    adam_epsilon: float = setting(1e-6, "Adam epsilon")
    weight_decay: float = setting(0.01, "decoupled weight decay; 0.01 is the original's effective value (its "
                                        "--weight_decay 0.0 was never passed, bitsandbytes' default 0.01 applied)",
                                  min=0.0)
    learning_rate: float = setting(2e-4, "learning rate", min=0.0)
    max_grad_norm: float = setting(0.3, "gradient-norm clip at each optimizer step (0: none)", min=0.0)
    gradient_checkpointing: bool = setting(False, "trade compute for memory (the original's True was never read)")
    lr_scheduler_type: str = setting("constant", "a transformers scheduler name")
    warmup_steps: int = ignored(300, "the original's constant schedule ignores warmup")
    per_device_train_batch_size: int = setting(4, "micro-batch size", min=1)
    gradient_accumulation_steps: int = setting(4, "micro-batches per optimizer step", min=1)
    per_device_eval_batch_size: int = setting(16, "batch size of validation generation and scoring", min=1)
    # model loading: 4-bit on CUDA with the original's numerics (its BitsAndBytesConfig: NF4, no double
    # quantisation, fp16 compute; no prepare_model_for_kbit_training); --quant_type comes from QuantizationSettings
    double_quant: bool = restated(_Q, "double_quant", False, "off as the original (its --double_quant True was "
                                                             "never read; its config left it off)", no_aliases=[])
    compute_dtype: str = restated(_Q, "compute_dtype", "fp16", "fp16 as the original")
    prepare_kbit_training: bool = restated(_Q, "prepare_kbit_training", False, "off as the original")
    lora_alpha: float = setting(16.0, "LoRA alpha")
    lora_dropout: float = setting(0.05, "LoRA dropout (with --keep_dropout; --disable_dropout, the default, sets it "
                                        "to 0)", min=0.0, max=1.0)
    disable_dropout: bool = setting(default_of(OfflineRLConfig, "disable_dropout"), DISABLE_DROPOUT_HELP,
                                    no_aliases=["--keep_dropout"])
    lora_r: int = setting(64, "LoRA rank (a new adapter with --adapter_path none)", min=1)
    max_memory_MB: int = ignored(40000)
    max_prompt_length: int = setting(MAX_PROMPT_LENGTH, "prompt tokens kept (the last ones), 640 as the original",
                                     min=1)
    max_length: int = ignored(768, "responses are cut at 128 tokens")
    num_train_epochs: int = ignored(1, "--max_steps decides")
    logging_steps: int = setting(10, "log every N optimizer steps", min=1)
    save_steps: int = ignored(2500, "checkpoints follow --eval_steps")
    max_steps: int = setting(9000, "optimizer steps", min=1)
    eval_steps: int = setting(900, "validate every N optimizer steps", min=0)
    output_dir: str = setting("./results", "outputs; the best adapter goes to OUTPUT/best_adapter")
    log_freq: int = ignored(1)
    sanity_check: bool = ignored(False)
    report_to: str = setting("none", "trackers: tensorboard, wandb, ... or none (the original's wandb was never read)")
    ignore_bias_buffers: bool = ignored(False)
    block_size: int = ignored(512)
    train_file_path: str = setting("data/hh_train_len2", "folder with cleaner_train.json")
    eval_file_path: str = setting("data/hh_dev/sampled_dev.json", "validation records")
    training_stage_num: int = ignored(2)
    cache_dir: str = setting("cache/", "reference / value / advantage caches")
    seed: int = setting(901, "random seed")
    # lolrl's additions
    reward_model: str | None = setting(None, "validation reward model: OpenAssistant-style or any one-logit sequence "
                                             "classifier (default the 1.4B OpenAssistant RM)")
    reward: str | None = setting(None, "instead of --reward_model: any lolrl reward spec (module:fn, file.py:fn, "
                                       "hf:...), or 'none' to validate by the dev responses' NLL without generating")
    prompt_format: str = setting("llama", "llama: the original system line and ### turns; chat: the tokenizer's "
                                          "chat template", choices=RENDERINGS)
    max_train_examples: int | None = setting(None, "first N training records (quick runs)", min=1)
    max_val_examples: int | None = setting(None, "first N validation records", min=1)
    stop_after_steps: int = setting(-1, "stop (checkpointed) after N optimizer steps; the same command resumes")

    def __post_init__(self) -> None:
        check_model_locations(self)


# The settings that name a model folder or hub id, each checked by check_model_locations when not ignored.
MODEL_LOCATIONS = ("model_name_or_path", "adapter_path", "reward_model", "tokenizer_name")


def check_model_locations(args) -> None:
    """Refuse, naming the flag and the path, a model location that is written as a local path
    (``/...``, ``./...``, ``~/...`` or ``a/b/c``) and does not exist: the hub client would otherwise
    take it for a repository id and fail with a traceback. 'org/name' is left to the hub (a missing
    one fails when it loads, in one line too)."""
    fields = {f.name: f for f in dataclasses.fields(args)}
    for name in MODEL_LOCATIONS:
        value = getattr(args, name, None)
        if name not in fields or fields[name].metadata.get("ignored") or value in (None, "", "none", "None"):
            continue
        looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
        if looks_local and not os.path.exists(os.path.expanduser(value)):
            raise ConfigError(f"--{name} {value!r}: no such folder")


@dataclass
class LogprobKernelArguments(HubSettings):
    """The settings of the scripts whose trainer is lolrl's own (A-LoL family, PRO, PPO): the log-prob kernel, and
    the hub upload of the best adapter folder with its model card (--push_to_hub, ...)."""

    logprob_kernel: str = setting(default_of(OfflineRLConfig, "logprob_kernel"), LOGPROB_KERNEL_HELP,
                                  choices=LOGPROB_KERNELS)


@dataclass
class ALoLHHArguments(LogprobKernelArguments, HHArguments):
    """lolrl_qlora_llama_hh.py: the A-LoL family and its baselines."""

    a2c_n_value_head_epochs: int = setting(10, "value-head epochs", min=1)
    algorithm: str = setting("nll", "objective", choices=ALGORITHMS)
    ppo_clip: float | None = setting(0.9, "importance-weight clip epsilon: 0 gives weight 1, none leaves it "
                                          "unclipped", min=0.0, max=1.0)
    kl_beta: float | None = setting(None, "A-LoL KL's beta (with --algorithm a_lol_kl; default: the engine's, "
                                          "logged); > 0 with --algorithm a_lol and --ppo_clip 0 is A-LoL KL (the "
                                          "original's spelling); 0 with other algorithms: no KL term (the "
                                          "original's default)", min=0.0)
    sampling_strategy: str | None = setting(None, "None/uniform (the original's None), good_priority, good_random, "
                                                  "or all_priority: both suffixes of every record, each with its "
                                                  "own reward", choices=(*HH_STRATEGIES, "None", "none"))
    value_source: Literal["generations", "data"] = setting(
        "generations", "V(x) fits the reward of the starting policy's generations on the dev prompts (the paper), "
                       "or the dev file's stored rewards of all its suffixes")
    value_samples: int = setting(1, "V(x) targets: 1 = reward of the greedy validation output (the original); "
                                    "K > 1 = mean reward of K sampled outputs per validation prompt", min=1)
    value_head: Literal["attention", "ridge"] = setting(
        "attention", "V(x)'s head: attention (the original's attention pooling, gradient steps) or ridge "
                     "(closed-form ridge regression on mean-pooled states)")
    given_flags: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)


@dataclass
class DPOHHArguments(HHArguments):
    """dpo_qlora_llama_hh.py: DPO through TRL's DPOTrainer."""

    per_device_train_batch_size: int = setting(2, "micro-batch size (preference pairs)", min=1)
    gradient_accumulation_steps: int = setting(8, "micro-batches per optimizer step", min=1)
    beta: float = setting(0.1, "DPO beta", min=0.0)
    reference_free: bool = setting(False, "reference log-ratio 0 (no reference model)")
    loss_type: str = setting("sigmoid", "any TRL DPO loss type (sigmoid = DPO, ipo, ...)")
    pair_order: str = setting("reward", "chosen = the higher-reward suffix, or the first suffix as the original",
                              choices=PAIR_ORDERS)
    ref_every_step: bool = setting(False, "run the reference adapter in every step instead of precomputing")


@dataclass
class PROHHArguments(LogprobKernelArguments, HHArguments):
    """pro_qlora_llama_hh.py: PRO, Preference Ranking Optimization."""

    per_device_train_batch_size: int = setting(2, "micro-batch size (prompts)", min=1)
    gradient_accumulation_steps: int = setting(8, "micro-batches per optimizer step", min=1)
    max_prompt_length: int = setting(MAX_PROMPT_LENGTH, "prompt tokens kept (the last ones); the original's 512 "
                                                        "was never read, its data loader kept 640", min=1)
    max_length: int = ignored(1024)
    training_stage_num: int = setting(2, "candidates per prompt", min=2, aliases=["--training_stage"])
    a2c_n_value_head_epochs: int = ignored(10)
    sampling_strategy: str | None = ignored(None)
    sft_weight: float = setting(0.05, "weight of the SFT term, times (stages-1)^2", min=0.0)


@dataclass
class PPOHHArguments(LogprobKernelArguments, HHArguments):
    """ppo_qlora_llama_hh.py: online PPO (or TRL's GRPO / RLOO)."""

    max_grad_norm: float = setting(0.0, "gradient-norm clip (0: none; the original's 0.3 was never passed, TRL "
                                        "0.7.1 did not clip)", min=0.0)
    output_dir: str = setting("checkpoints/ppo_qlora_llama", "outputs; the best adapter goes to OUTPUT/best_adapter")
    a2c_n_value_head_epochs: int = ignored(10)
    algorithm: str = ignored("nll")
    ppo_clip: float = setting(0.2, "clip range of the probability ratio (the original's flag was not passed; "
                                   "TRL's default 0.2 applied)", min=0.0)
    kl_beta: float = setting(0.2, "initial KL coefficient (TRL's init_kl_coef)", min=0.0)
    sampling_strategy: str | None = ignored(None)
    target_kl: float = setting(0.1, "with --early_stopping: end a step's PPO epochs once the KL exceeds 1.5x this")
    batched_gen: bool = ignored(False)
    total_steps: int | None = setting(None, f"PPO steps (one rollout batch each; default {PPO_STEPS})", min=1)
    max_steps: int | None = setting(None, "another spelling of --total_steps (give either; both: they must agree)",
                                    min=1)
    eval_steps: int = setting(100, "validate every N PPO steps", min=0)
    learning_rate: float = setting(2e-5, "learning rate", min=0.0)
    warmup_steps: int = setting(300, "optimizer steps of warmup for a schedule that has one (e.g. "
                                     "--lr_scheduler_type linear); the default constant schedule ignores it", min=0)
    ppo_rollout_batch_size: int = setting(16, "rollouts per PPO step", min=1)
    ppo_epochs: int = setting(4, "PPO epochs per rollout batch", min=1)
    save_steps: int = setting(0, "checkpoint every N steps (0: at every validation, -1: never)")
    # lolrl's additions (TRL 0.7.1's PPOConfig defaults)
    adap_kl_ctrl: bool = setting(True, "adapt the KL coefficient toward --kl_target (--no_adap_kl_ctrl: fixed)")
    kl_target: float = setting(6.0, "target KL of the adaptive controller")
    kl_horizon: float = setting(10000.0, "horizon of the adaptive controller")
    kl_penalty: str = setting("kl", "per-token KL estimate", choices=PPO_KL_PENALTIES)
    cliprange_value: float = setting(0.2, "clip range of the value loss")
    vf_coef: float = setting(0.1, "value-loss coefficient")
    gamma: float = setting(1.0, "discount")
    lam: float = setting(0.95, "GAE lambda")
    use_score_scaling: bool = setting(True, "scale scores by their running std")
    use_score_norm: bool = setting(True, "with scaling: also subtract their running mean")
    early_stopping: bool = setting(False, "end a step's PPO epochs once the policy KL exceeds 1.5 x --target_kl")
    top_p: float = setting(0.95, "rollout nucleus sampling", min=0.0, max=1.0)
    temperature: float = setting(1.0, "rollout temperature", min=0.0)
    top_k: int = setting(50, "rollout top-k (0: none); 50 is what the original's rollouts got from transformers' "
                             "defaults", min=0)
    max_new_tokens: int = setting(128, "rollout and validation length", min=1)
    trainer: str = setting("ppo", "ppo (lolrl.online.ppo); grpo or rloo: TRL's trainers with the same reward "
                                  "and validation", choices=("ppo", "grpo", "rloo"))
    num_generations: int = setting(4, "grpo/rloo: samples per prompt (group size)", min=2)
    no_resume: bool = setting(False, "start over even if OUTPUT/checkpoints exists")

    def __post_init__(self) -> None:
        super().__post_init__()
        # one setting, two spellings (the original's --total_steps; HF's --max_steps)
        given = {v for v in (self.total_steps, self.max_steps) if v is not None}
        if len(given) > 1:
            raise ConfigError(f"--total_steps {self.total_steps} and --max_steps {self.max_steps} disagree: "
                              "they are one setting, give one of them")
        self.total_steps = self.max_steps = given.pop() if given else PPO_STEPS


@dataclass
class HHEvalArguments(HHArguments):
    """qlora_llama_hh_eval.py: a base model plus adapter on the HH test splits."""

    max_prompt_length: int = setting(MAX_PROMPT_LENGTH, "prompt tokens kept (the original's 512 was never read)",
                                     min=1)
    max_length: int = ignored(1024)
    max_steps: int = ignored(10000)
    eval_steps: int = ignored(1000)
    a2c_n_value_head_epochs: int = ignored(10)
    algorithm: str = ignored("nll")
    reward_model: str | None = setting(TEST_RM, "test reward model: OpenAssistant Pythia (path or hub id)")
    test_dir: str = setting("data/hh_test", "folder with the test splits")
    rm_batch_size: int = setting(4, "batch size of the test reward model", min=1)
    exclude_bad_indices: bool = setting(False, "skip the records listed in bad_test_indices.json")
    max_examples: int | None = setting(None, "per split, for quick checks", min=1)
    tokenizer_name: str | None = setting(None, "default: the model's own")


@dataclass
class PPOEvalArguments(HHEvalArguments):
    """ppo_hh_eval.py: a full (non-adapter) causal LM, e.g. a released PPO checkpoint, in the Anthropic format."""

    model_name_or_path: str = setting("reciprocate/ppo_hh_pythia-6B", "a full causal LM (the original's "
                                                                      "llama-7b default is no PPO model)")
    adapter_path: str | None = ignored("timdettmers/qlora-hh-rlhf-7b", "a full model is evaluated")
    tokenizer_name: str | None = setting(None, "default: the model's own (GPT-NeoX-20B's for "
                                               "reciprocate/ppo_hh_neox-20B)")


# Training fields the evaluation scripts accept (the original's dataclass) but do not read.
EVAL_IGNORED = ("optim", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "learning_rate", "max_grad_norm",
                "gradient_checkpointing", "prepare_kbit_training", "lr_scheduler_type", "per_device_train_batch_size",
                "gradient_accumulation_steps", "lora_alpha", "lora_dropout", "lora_r", "logging_steps",
                "train_file_path", "eval_file_path", "cache_dir", "seed", "report_to", "reward", "max_train_examples",
                "max_val_examples", "stop_after_steps", "prompt_format", "disable_dropout")


def parse_hh(cls: type, argv: list[str] | None, description: str | None):
    """The script's settings from ``argv``; the evaluation scripts label the training fields ignored."""
    ignore = EVAL_IGNORED if issubclass(cls, HHEvalArguments) else ()
    return DataclassParser(cls, description=description, ignore=ignore).parse_one(argv)


def check_kl_spelling(args: ALoLHHArguments) -> str:
    """The algorithm to run: ``--algorithm a_lol_kl``, or the original's spelling of A-LoL KL,
    ``--algorithm a_lol --ppo_clip 0 --kl_beta B`` with B > 0. ``--kl_beta 0`` (or not given) with any
    other algorithm is the original's default, no KL term. ``--kl_beta 0`` with ``a_lol_kl`` runs, with
    a warning: without its KL term the loss is a_lol_ref_free's."""
    if args.algorithm == "a_lol_kl":
        if args.kl_beta == 0:
            logger.warning("--kl_beta 0 with --algorithm a_lol_kl: no KL term, so the loss is a_lol_ref_free's "
                           "(A+ x NLL, no importance weight); leave --kl_beta out for a_lol_kl's default beta")
        return "a_lol_kl"
    if not args.kl_beta:
        return args.algorithm
    if args.algorithm != "a_lol" or args.ppo_clip != 0:
        raise ConfigError("--kl_beta > 0 means A-LoL KL: use it with --algorithm a_lol_kl, or with --algorithm a_lol "
                          "and --ppo_clip 0 (the original's spelling)")
    return "a_lol_kl"


def run_offline(args: HHArguments, build) -> int:
    """Read the data, build ``(config, TaskData)`` with ``build(args, train_rows, dev_rows)``, train on the
    engine with the HH validation reward; user errors end in one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(args)
        config, data = build(args, train_rows, dev_rows)
        from lolrl.engine.trainer import OfflineRLTrainer

        trainer = OfflineRLTrainer(args=config, data=data, reward=validation_reward(args),
                                   postprocess=hh_postprocess(args))
        results = trainer.run()
    except UserError as exc:
        return report_user_error(exc)
    if results:
        reward = results["val/generated"].get("final_reward")
        print((f"validation reward of the best adapter: {reward:.4f}; " if reward is not None else "")
              + f"adapter in {config.save_dir}")
    return 0
