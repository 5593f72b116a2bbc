"""The HH scripts' settings, generated into their command lines.

:class:`HHData` holds the original ``ScriptArguments``' data fields and :class:`HHTraining` its
training fields under TrainingArguments' names, with the original's defaults, declared once for
every HH script. The offline scripts (``lolrl_qlora_llama_hh.py``, ``pro_qlora_llama_hh.py``) parse
straight into the engine's config (:class:`ALoLHHConfig`, :class:`PROHHConfig`, subclasses of
``OfflineRLConfig``) plus their data settings; DPO into TRL's ``DPOConfig`` (:class:`DPOHHConfig`), PPO into
:class:`lolrl.online.ppo.PPOConfig` (:class:`PPOHHConfig`), each with its data settings; the evaluation scripts
into one :class:`HHArguments` subclass each. A field the original parsed but never read is accepted and
labelled so in ``--help`` (:func:`ignored`). Parsing: :class:`lolrl.utils.cli.DataclassParser`
(``--flag False``, ``--no_flag``, ``--config FILE.yaml``, one-line errors with exit status 2).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from trl import DPOConfig

from lolrl.engine.config import DISABLE_DROPOUT_HELP, OfflineRLConfig
from lolrl.engine.generation import GenerationSettings
from lolrl.engine.modeling import LoraSettings, QuantizationSettings
from lolrl.engine.optim import resolve as resolve_optimizer
from lolrl.engine.sampling import STRATEGIES as SAMPLING_STRATEGIES
from lolrl.online.ppo import PPOConfig
from lolrl.tasks.hh.data import RENDERINGS
from lolrl.tasks.hh.preference import PAIR_ORDERS
from lolrl.tasks.hh.reward_model import TEST_RM
from lolrl.tasks.hh.shared import MAX_PROMPT_LENGTH, adapter_of
from lolrl.utils.cli import DataclassParser, default_of, ignored, restated, setting
from lolrl.utils.errors import ConfigError

logger = logging.getLogger(__name__)
HH_STRATEGIES = (*SAMPLING_STRATEGIES, "all_priority")
PPO_STEPS = 1000  # the original's --total_steps default


@dataclass
class HHData:
    """The HH data and validation reward model (the original ScriptArguments' data fields)."""

    train_file_path: str = setting("data/hh_train_len2", "folder with cleaner_train.json")
    eval_file_path: str = setting("data/hh_dev/sampled_dev.json", "validation records")
    prompt_format: str = setting("llama", "llama: the original system line and ### turns; chat: the tokenizer's "
                                          "chat template", choices=RENDERINGS)
    reward_model: str | None = setting(None, "validation reward model: OpenAssistant-style or any one-logit sequence "
                                             "classifier (default the 1.4B OpenAssistant RM)")
    max_train_examples: int | None = setting(None, "first N training records (quick runs)", min=1)
    max_memory_MB: int = ignored(40000)
    max_length: int = ignored(768, "responses are cut at 128 tokens")
    log_freq: int = ignored(1)
    sanity_check: bool = ignored(False)
    ignore_bias_buffers: bool = ignored(False)
    block_size: int = ignored(512)


@dataclass
class HHTraining:
    """The HH scripts' training settings, with the original's defaults, under TrainingArguments' names
    (``OfflineRLConfig``'s fields, restated once here for every HH script)."""

    model_name: str = setting("huggyllama/llama-7b", "base model: hub id or path", aliases=["--model_name_or_path"])
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
    activation_checkpointing: bool = setting(False, "trade compute for memory (the original's True was never read)",
                                             aliases=["--gradient_checkpointing"])
    lr_scheduler_type: str = setting("constant", "a transformers scheduler name")
    warmup_steps: float = setting(300, "warmup steps of a schedule that has one (e.g. --lr_scheduler_type linear); "
                                       "the original's constant schedule ignores it", min=0)
    per_device_train_batch_size: int = setting(4, "micro-batch size", min=1)
    gradient_accumulation_steps: int = setting(4, "micro-batches per optimizer step", min=1)
    per_device_eval_batch_size: int = setting(16, "batch size of validation generation and scoring", min=1)
    # 4-bit on CUDA with the original's numerics: its BitsAndBytesConfig (NF4, no double quantisation, fp16
    # compute), no prepare_model_for_kbit_training (its --double_quant True was never read)
    quantization: QuantizationSettings = setting(
        QuantizationSettings(double_quant=False, compute_dtype="fp16", prepare_kbit_training=False),
        "4-bit quantisation on CUDA", flatten="")
    lora: LoraSettings = setting(LoraSettings(r=64, alpha=16.0, dropout=0.05),
                                 "LoRA (a new adapter with --adapter_path none)", flatten="lora_")
    disable_dropout: bool = setting(default_of(OfflineRLConfig, "disable_dropout"), DISABLE_DROPOUT_HELP,
                                    no_aliases=["--keep_dropout"])
    max_prompt_length: int = setting(MAX_PROMPT_LENGTH, "prompt tokens kept (the last ones), 640 as the original",
                                     min=1)
    num_train_epochs: float = ignored(0, "--max_steps decides")
    logging_steps: float = setting(10, "log every N optimizer steps", min=1)
    save_steps: float = setting(0, "checkpoint every N optimizer steps (the original's --save_steps was never read); "
                                   "0: at every validation; -1: never")
    max_steps: int = setting(9000, "optimizer steps", min=1)
    eval_steps: float = setting(900, "validate every N optimizer steps (0: never)", min=0)
    output_dir: str = setting("./results", "outputs; the best adapter goes to OUTPUT/best_adapter")
    report_to: str = setting("none", "trackers: tensorboard, wandb, ... or none (the original's wandb was never read)")
    cache_dir: str = setting("cache/", "reference / value / advantage caches")
    seed: int = setting(901, "random seed")
    # lolrl's additions
    reward: str | None = setting(None, "instead of --reward_model: any lolrl reward spec (module:fn, file.py:fn, "
                                       "hf:...), or 'none' to validate by the dev responses' NLL without generating")
    max_val_examples: int | None = setting(None, "first N validation records", min=1)
    stop_after_steps: int = setting(-1, "stop (checkpointed) after N optimizer steps; the same command resumes")


@dataclass
class UnreadOfflineFlags:
    """The original's offline flags that the DPO, PPO and evaluation scripts parsed and never read."""

    a2c_n_value_head_epochs: int = ignored(10)
    algorithm: str = ignored("nll")
    sampling_strategy: str | None = ignored(None)
    training_stage_num: int = ignored(2)


@dataclass
class HHArguments(HHTraining, HHData, UnreadOfflineFlags):
    """Settings of the HH evaluation scripts."""

    def __post_init__(self) -> None:
        self.adapter_path = adapter_of(self)
        check_model_locations(self)


# The settings that name a model folder or hub id, each checked by check_model_locations when not ignored.
MODEL_LOCATIONS = ("model_name", "adapter_path", "reward_model", "tokenizer_name")


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
            flags = "/".join([f"--{name}", *fields[name].metadata.get("aliases", [])])
            raise ConfigError(f"{flags} {value!r}: no such folder")


@dataclass
class HHOfflineConfig(HHTraining, OfflineRLConfig):
    """The engine's config for HH: the HH scripts' defaults; validation from the first step (greedy, 128 tokens,
    stopping at the next '###' turn), no test split (qlora_llama_hh_eval.py's), 4-bit and bf16 on CUDA."""

    task_name: str | None = restated(OfflineRLConfig, "task_name", "hh")
    eval_on_start: bool = restated(OfflineRLConfig, "eval_on_start", True, "as the original")
    do_predict: bool = restated(OfflineRLConfig, "do_predict", False, "the HH test is qlora_llama_hh_eval.py's")
    generation: GenerationSettings = restated(
        OfflineRLConfig, "generation", GenerationSettings(num_beams=1, repetition_penalty=1.0, stop_texts=[" ###"]),
        "greedy, stopping at the next ' ###' turn, as the original validates")
    bf16: bool | None = setting(None, "bf16 autocast; none: on CUDA (the original's 4-bit runs), fp32 elsewhere")
    load_in_4bit: bool | None = restated(OfflineRLConfig, "load_in_4bit", None, "none: on CUDA")

    def __post_init__(self) -> None:
        self.adapter_path = adapter_of(self)
        check_model_locations(self)
        cuda = torch.cuda.is_available()
        if (self.load_in_4bit is None or self.bf16 is None) and not cuda:
            logger.warning("no CUDA device: plain LoRA on an fp32 base instead of 4-bit QLoRA")
        self.load_in_4bit = cuda if self.load_in_4bit is None else self.load_in_4bit
        self.bf16 = cuda if self.bf16 is None else self.bf16
        self.save_dir = self.save_dir or str(Path(self.output_dir) / "best_adapter")
        if self.eval_steps:  # validate every eval_steps optimizer steps; 0: never
            self.eval_strategy = "steps"
        else:
            self.eval_strategy, self.eval_steps = "no", None
        super().__post_init__()


@dataclass
class ALoLHHData(HHData):
    """lolrl_qlora_llama_hh.py's data settings."""

    training_stage_num: int = ignored(2)


@dataclass
class ALoLHHConfig(HHOfflineConfig):
    """lolrl_qlora_llama_hh.py: the A-LoL family and its baselines."""

    value_epochs: int = restated(OfflineRLConfig, "value_epochs", 10, "the original's 10")
    kl_beta: float | None = restated(OfflineRLConfig, "kl_beta", None, "> 0 with --algorithm a_lol and --ppo_clip 0 "
                                     "is A-LoL KL (the original's spelling); 0 with other algorithms: no KL term "
                                     "(the original's default)")
    sampling_strategy: str | None = restated(OfflineRLConfig, "sampling_strategy", None, "the original's None is "
                                             "uniform; all_priority: good_priority over both suffixes of every "
                                             "record, each with its own reward",
                                             choices=(*HH_STRATEGIES, "None", "none"))
    train_candidates: str = setting("sft", "training rows: the sft_index suffix of each record, or all suffixes "
                                           "(--sampling_strategy all_priority sets all)", choices=("sft", "all"))

    def __post_init__(self) -> None:
        if self.sampling_strategy == "all_priority":
            self.train_candidates, self.sampling_strategy = "all", "good_priority"
        algorithm = check_kl_spelling(self)
        if algorithm == "a_lol_kl":
            if not self.ppo_clip_given:  # a_lol_kl: only a given clip (the engine refuses one > 0)
                self.ppo_clip = None
        else:
            self.kl_beta = None  # 0 (or not given): no KL term, the original's default
        self.algorithm, beta_given = algorithm, self.kl_beta is not None
        super().__post_init__()
        if algorithm == "a_lol_kl":
            logger.info("a_lol_kl: KL beta %g%s", self.kl_beta,
                        "" if beta_given else " (the engine's default; --kl_beta not given)")


@dataclass
class DPOHHData(HHData, UnreadOfflineFlags):
    """dpo_qlora_llama_hh.py's data settings (and the original's flags DPO does not read)."""

    # the original's --max_length (never read) is DPOConfig's max_length here (DPOHHConfig)
    max_length: int = setting(768, "see DPOHHConfig.max_length", hidden_field=True)
    pair_order: str = setting("reward", "chosen = the higher-reward suffix, or the first suffix as the original",
                              choices=PAIR_ORDERS)


@dataclass
class DPOHHConfig(HHTraining, DPOConfig):
    """dpo_qlora_llama_hh.py: TRL's DPOConfig with the HH scripts' defaults (batch 2 x 8, as the original's DPO);
    DPOTrainer gets it as parsed, with the derived values set here: checkpoints in OUTPUT/checkpoints (by
    :func:`lolrl.tasks.hh.dpo.train_dpo`), reference log-probs precomputed unless reference-free or
    --ref_every_step, bf16 on CUDA."""

    per_device_train_batch_size: int = setting(2, "micro-batch size (preference pairs)", min=1)
    gradient_accumulation_steps: int = setting(8, "micro-batches per optimizer step", min=1)
    beta: float = restated(DPOConfig, "beta", 0.1, min=0.0)
    loss_type: list[str] = restated(DPOConfig, "loss_type", ["sigmoid"], "any TRL DPO loss type (sigmoid = DPO, "
                                                                       "ipo, ...)")
    max_length: int | None = ignored(None, "TRL truncates nothing: prompts keep their last --max_prompt_length "
                                           "tokens, responses their first 128 (the original's --max_length)")
    reference_free: bool = setting(False, "reference log-ratio 0 (no reference model)")
    ref_every_step: bool = setting(False, "run the reference adapter in every step instead of precomputing")
    bf16: bool | None = setting(None, "bf16 autocast; none: on CUDA (the original's 4-bit runs), fp32 elsewhere")
    gradient_checkpointing: bool | None = setting(None, "TrainingArguments' name: --gradient_checkpointing sets "
                                                        "activation_checkpointing", hidden_field=True)
    remove_unused_columns: bool = setting(False, "kept False: the pairs' columns reach TRL", hidden_field=True)
    save_total_limit: int | None = setting(2, "checkpoints kept", min=1)

    def __post_init__(self) -> None:
        self.adapter_path = adapter_of(self)
        check_model_locations(self)
        cuda = torch.cuda.is_available()  # plain LoRA in fp32 elsewhere (the run's model loading says so)
        self.bf16, self.use_cpu = cuda if self.bf16 is None else self.bf16, not cuda
        self.gradient_checkpointing = self.activation_checkpointing
        self.optim = resolve_optimizer(self.optim)
        self.precompute_ref_log_probs = not self.reference_free and not self.ref_every_step
        self.precompute_ref_batch_size = self.per_device_eval_batch_size
        if self.save_steps == -1:  # never
            self.save_strategy, self.save_steps = "no", 0
        elif self.save_steps == 0:  # at the validations (every eval_steps; 500 without them)
            self.save_steps = self.eval_steps if self.eval_steps and self.eval_steps > 0 else 500
        try:
            super().__post_init__()
        except ValueError as exc:  # TrainingArguments' and TRL's own checks: one line
            raise ConfigError(str(exc).splitlines()[0]) from None


@dataclass
class PROHHData(HHData):
    """pro_qlora_llama_hh.py's data settings."""

    max_length: int = ignored(1024)


@dataclass
class PROHHConfig(HHOfflineConfig):
    """pro_qlora_llama_hh.py: PRO, Preference Ranking Optimization, on the same engine."""

    algorithm: str = restated(OfflineRLConfig, "algorithm", "pro", ignored=True)
    group_size: int = restated(OfflineRLConfig, "group_size", 2, "candidates per prompt", min=2,
                               aliases=["--training_stage_num", "--training_stage"])
    sft_weight: float = restated(OfflineRLConfig, "sft_weight", 0.05, "times (stages-1)^2", min=0.0)
    sampling_strategy: str | None = restated(OfflineRLConfig, "sampling_strategy", "uniform", ignored=True)
    value_epochs: int = restated(OfflineRLConfig, "value_epochs", 10, ignored=True)
    per_device_train_batch_size: int = setting(2, "micro-batch size (prompts)", min=1)
    gradient_accumulation_steps: int = setting(8, "micro-batches per optimizer step", min=1)
    max_prompt_length: int = setting(MAX_PROMPT_LENGTH, "prompt tokens kept (the last ones); the original's 512 "
                                                        "was never read, its data loader kept 640", min=1)


@dataclass
class PPOHHData(HHData, UnreadOfflineFlags):
    """ppo_qlora_llama_hh.py's data settings (and the original's flags PPO does not read)."""

    batched_gen: bool = ignored(False)


@dataclass
class PPOHHConfig(HHTraining, PPOConfig):
    """ppo_qlora_llama_hh.py: online PPO (lolrl.online.ppo), or TRL's GRPO / RLOO, on the HH settings: PPO's
    defaults where they are not the HH scripts' (the original's PPOConfig and TRL 0.7.1's), 4-bit and bf16 on CUDA."""

    output_dir: str = restated(HHTraining, "output_dir", "checkpoints/ppo_qlora_llama")
    max_steps: int | None = setting(None, f"PPO steps (one rollout batch each; default {PPO_STEPS}); --total_steps "
                                          "is the original's spelling of it (both given: they must agree)", min=1)
    total_steps: int | None = setting(None, "the original's spelling of --max_steps", min=1)
    learning_rate: float = restated(PPOConfig, "learning_rate", 2e-5, "the original's PPO learning rate")
    max_grad_norm: float = restated(PPOConfig, "max_grad_norm", 0.0, "the original's 0.3 was never passed, TRL 0.7.1 "
                                                                     "did not clip")
    eval_steps: float = restated(PPOConfig, "eval_steps", 100)
    logging_steps: float = restated(PPOConfig, "logging_steps", 1, "as TRL 0.7.1 logged every step")
    cliprange: float = restated(PPOConfig, "cliprange", 0.2, "the original's --ppo_clip was not passed; TRL's default "
                                                             "0.2 applied")
    init_kl_coef: float = restated(PPOConfig, "init_kl_coef", 0.2, "the original's --kl_beta, TRL's init_kl_coef")
    rollout: GenerationSettings = restated(
        PPOConfig, "rollout", dataclasses.replace(default_of(PPOConfig, "rollout"), stop_texts=[" ###"]),
        "top-p 0.95, top-k 50 (what the original's rollouts got from transformers' defaults), 128 tokens, stopping "
        "at the next ' ###' turn")
    bf16: bool | None = setting(None, "bf16 autocast; none: on CUDA (the original's 4-bit runs), fp32 elsewhere")
    load_in_4bit: bool | None = restated(PPOConfig, "load_in_4bit", None, "none: on CUDA")
    trainer: str = setting("ppo", "ppo (lolrl.online.ppo); grpo or rloo: TRL's trainers with the same reward "
                                  "and validation", choices=("ppo", "grpo", "rloo"))
    num_generations: int = setting(4, "grpo/rloo: samples per prompt (group size)", min=2)

    def __post_init__(self) -> None:
        # one setting, two spellings (the original's --total_steps; HF's --max_steps)
        given = {v for v in (self.total_steps, self.max_steps) if v is not None}
        if len(given) > 1:
            raise ConfigError(f"--total_steps {self.total_steps} and --max_steps {self.max_steps} disagree: "
                              "they are one setting, give one of them")
        self.total_steps = self.max_steps = given.pop() if given else PPO_STEPS
        self.adapter_path = adapter_of(self)
        check_model_locations(self)
        on_cuda_unless_given(self, ("bf16", "load_in_4bit"))
        super().__post_init__()


def on_cuda_unless_given(config, names: tuple[str, ...]) -> None:
    """The settings ``names`` left None: True on CUDA (the original's 4-bit bf16 runs), False elsewhere, saying so."""
    cuda = torch.cuda.is_available()
    unset = [name for name in names if getattr(config, name) is None]
    if unset and not cuda:
        logger.warning("no CUDA device: plain LoRA on an fp32 base instead of 4-bit QLoRA")
    for name in unset:
        setattr(config, name, cuda)


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

    model_name: str = restated(HHTraining, "model_name", "reciprocate/ppo_hh_pythia-6B", "a full causal LM (the "
                               "original's llama-7b default is no PPO model)")
    adapter_path: str | None = ignored("timdettmers/qlora-hh-rlhf-7b", "a full model is evaluated")
    tokenizer_name: str | None = setting(None, "default: the model's own (GPT-NeoX-20B's for "
                                               "reciprocate/ppo_hh_neox-20B)")


# Training fields the evaluation scripts accept (the original's dataclass) but do not read.
EVAL_IGNORED = ("optim", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "learning_rate", "max_grad_norm",
                "activation_checkpointing", "prepare_kbit_training", "lr_scheduler_type", "per_device_train_batch_size",
                "gradient_accumulation_steps", "lora_alpha", "lora_dropout", "lora_r", "logging_steps",
                "train_file_path", "eval_file_path", "cache_dir", "seed", "report_to", "reward", "max_train_examples",
                "max_val_examples", "stop_after_steps", "prompt_format", "disable_dropout")


def parse_hh(classes: type | tuple[type, ...], argv: list[str] | None, description: str | None):
    """The script's settings from ``argv`` (one dataclass, or a tuple of them for a tuple of classes); the
    evaluation scripts label the training fields ignored."""
    parsed = settings_parser(classes, description).parse(argv)
    return parsed if isinstance(classes, tuple) else parsed[0]


def settings_parser(classes: type | tuple[type, ...], description: str | None = None) -> DataclassParser:
    """The command line of an HH script's settings dataclasses."""
    classes = classes if isinstance(classes, tuple) else (classes,)
    ignore = EVAL_IGNORED if any(issubclass(c, HHEvalArguments) for c in classes) else ()
    return DataclassParser(*classes, description=description, ignore=ignore)


def check_kl_spelling(args: OfflineRLConfig) -> str:
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
