"""The configuration of one offline run: a ``transformers.TrainingArguments`` with A-LoL's own settings.

As TRL's configs (``DPOConfig``, ``GRPOConfig``), :class:`OfflineRLConfig` subclasses
``TrainingArguments``: the optimizer, schedule, batch sizes, accumulation, precision (``bf16`` /
``fp16``), logging, checkpoints, trackers (``report_to``) and the hub keep the Trainer's names and
meaning. The fields declared here are what lolrl adds: the algorithm and its objective, the value
estimate, validation by generation and reward, the stage caches and the trust guarantees. A few
inherited defaults are the paper's (each restated below with the reason).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from lolrl.engine.generation import GenerationSettings
from lolrl.engine.losses import GROUPED_ALGORITHMS, KL_ESTIMATORS, TABLE, Algorithm
from lolrl.engine.model_card import HubSettings
from lolrl.engine.modeling import (
    LOGPROB_KERNEL_HELP,
    LOGPROB_KERNELS,
    LoraSettings,
    QuantizationSettings,
    check_logprob_kernel,
)
from lolrl.engine.runtime import check_report_to, has_accelerator_device
from lolrl.engine.sampling import STRATEGIES, canonical_strategy
from lolrl.utils.cli import setting
from lolrl.utils.errors import ConfigError
from lolrl.utils.lock import check_output_paths

__all__ = ["ConfigError", "RunConfig", "OfflineRLConfig", "DISABLE_DROPOUT_HELP"]

VALUE_SOURCES = ("generations", "data", "group")
GROUP_SINGLETONS = ("generations", "data", "refuse")

# The --disable_dropout flag of every training script (its default: OfflineRLConfig.disable_dropout).
DISABLE_DROPOUT_HELP = ("dropout off (LoRA's too) in the model trained, for every algorithm alike (and pi_ref's own "
                        "NLL run): the importance weight is 1 at step 0; --keep_dropout (or --disable_dropout False) "
                        "keeps the model's dropout for every algorithm, as the original")


def warmup_ratio(text: str) -> float:
    """the original's share of the steps warming up, in [0, 1] (1: all of them)"""
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"expected a share in [0, 1], got {value}")
    return min(value, 1 - 1e-9)  # transformers reads a warmup_steps below 1 as a share of the steps


# --dtype fp32|bf16|fp16: the precision flags in one (autocast; fp32 is neither)
DTYPE_FLAGS = {"fp32": {"bf16": False, "fp16": False}, "bf16": {"bf16": True, "fp16": False},
               "fp16": {"bf16": False, "fp16": True}}


@dataclass
class RunConfig(TrainingArguments):
    """What every lolrl run adds to ``TrainingArguments``, once: the offline runs' :class:`OfflineRLConfig` and
    PPO's :class:`lolrl.online.ppo.PPOConfig` subclass it. The model and its LoRA / 4-bit settings, the
    resume and stop rules, the non-finite guard, and the preparation every run shares: an ``output_dir``
    required, the CPU said when there is no accelerator, the scripts' spellings (``--gradient_checkpointing``,
    ``--save_steps -1``), the optimizer name resolved, trackers and hub checked, then the subclass's
    :meth:`complete` and :meth:`validate`, and TrainingArguments' own checks turned into one-line errors."""

    report_to: None | str | list[str] = setting("none", "trackers: tensorboard, wandb, ... or none")
    save_total_limit: int | None = setting(2, "checkpoints kept", aliases=["--keep_checkpoints"], min=1)
    optim: str = setting("adamw_torch", "a transformers optimizer name; the paged and 8-bit ones need CUDA and "
                         "bitsandbytes (else adamw_torch with the same lr, betas, eps, weight decay, and a warning)")
    activation_checkpointing: bool = setting(False, "trade compute for memory (gradient checkpointing)",
                                             aliases=["--gradient_checkpointing"])
    gradient_checkpointing: bool | None = setting(None, "TrainingArguments' deprecated name: --gradient_checkpointing "
                                                  "sets activation_checkpointing", hidden_field=True)

    # ------------------------------------------------------------------------------------ model
    tokenizer_name: str | None = setting(None, "tokenizer, when not the model's")
    lora: LoraSettings = setting(LoraSettings(), "LoRA settings (r=0: train all weights)", flatten="lora_")
    load_in_4bit: bool = setting(False, "QLoRA: quantise the frozen base to 4-bit (CUDA + bitsandbytes; plain LoRA "
                                        "otherwise, with a warning), as --quant_type, --double_quant, --compute_dtype "
                                        "and --prepare_kbit_training say")
    quantization: QuantizationSettings = setting(QuantizationSettings(), "how load_in_4bit quantises", flatten="")
    logprob_kernel: str = setting("auto", LOGPROB_KERNEL_HELP, choices=LOGPROB_KERNELS)

    # ------------------------------------------------------------------------- resume, guard
    resume: str = setting("auto", "continue from the latest checkpoint in OUTPUT/checkpoints: auto (whenever one "
                          "exists), must (--resume alone) or never (--no_resume)", choices=("auto", "must", "never"),
                          const="must", no_aliases=["--no_resume"], no_value="never")
    stop_after_steps: int = setting(-1, "stop, checkpointed, after this many optimizer steps; the same command "
                                        "resumes")
    max_nonfinite_steps: int = setting(3, "optimizer steps in a row with a NaN/inf loss or gradient before the run "
                                          "stops", min=1)

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError(f"{type(self).__name__} needs an output_dir (where the run writes its results)")
        if not has_accelerator_device():
            # said, not left to chance: bf16 autocast on the CPU, and `torchrun` / `accelerate launch` then run
            # several CPU processes (gloo), as Accelerate's cpu=True does
            self.use_cpu = True
        if self.gradient_checkpointing is not None:  # TrainingArguments' deprecated spelling
            self.activation_checkpointing, self.gradient_checkpointing = self.gradient_checkpointing, None
        if self.save_steps == -1:  # the scripts' "never"
            self.save_strategy, self.save_steps = "no", 0
        self.complete()
        from lolrl.engine.optim import optimizer_names, resolve

        if self.optim not in optimizer_names():
            raise ConfigError(f"--optim: unknown optimizer '{self.optim}' (expected a transformers optimizer name, "
                              "e.g. adamw_torch or paged_adamw_32bit)")
        self.optim = resolve(self.optim)
        check_report_to(",".join(self.report_to) if isinstance(self.report_to, list) else self.report_to)
        self.hub.check()
        self.validate()
        try:
            super().__post_init__()
        except ValueError as exc:  # TrainingArguments' own checks: one line, as ours
            raise ConfigError(str(exc).splitlines()[0]) from None

    def complete(self) -> None:
        """The run's derived defaults (a subclass's; ``output_dir`` is known here)."""

    def validate(self) -> None:
        """The checks every run shares; a subclass adds its own and calls this."""
        if self.resume not in ("auto", "must", "never"):
            raise ConfigError(f"resume must be auto, must or never, got '{self.resume}'")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.save_steps < 0:
            raise ConfigError(f"--save_steps must be >= 0 (save_strategy 'no' never saves), got {self.save_steps}")
        check_logprob_kernel(self.logprob_kernel)
        self.quantization.check()

    @property
    def dtype(self) -> str:
        """The run's precision: bf16 or fp16 (autocast, as the Trainer's ``bf16`` / ``fp16``) or fp32."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    @property
    def hub(self) -> HubSettings:
        return HubSettings.of(self)

    def to_dict(self) -> dict:
        """Every setting (args.json, the trackers' hyper-parameters, the resume key), nested settings as
        mappings, the hub token hidden (TrainingArguments hides every ``*_token``)."""
        values = super().to_dict()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                values[f.name] = dataclasses.asdict(value)
        return values


@dataclass
class OfflineRLConfig(RunConfig):
    """Every setting of an offline run (all eight algorithms share it). Defaults follow the paper where
    the original code contradicts it: importance weights clipped to [1-0.9, 1+0.9], priority sampling
    on for A-LoL, a finite ``kl_beta`` for ``a_lol_kl``, dropout off for every algorithm."""

    # ------------------------------------------------------------------ TrainingArguments, our defaults
    output_dir: str | None = setting(None, "logs, statistics, results, plots and checkpoints", aliases=["-o"])
    per_device_train_batch_size: int = setting(16, "rows per process per micro-batch", aliases=["-bs", "--batch_size"],
                                              min=1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step",
                                              aliases=["-as", "--accumulation_steps"], min=1)
    per_device_eval_batch_size: int = setting(64, "rows per process per generation / scoring batch",
                                             aliases=["-v_bs", "--val_batch_size"], min=1)
    num_train_epochs: float = setting(4, "epochs over the (priority-shortened) training rows",
                                     aliases=["-e", "--n_epochs"], min=0)
    learning_rate: float = setting(2e-5, "AdamW learning rate", aliases=["-lr"], min=0.0)
    weight_decay: float = setting(0.01, "weight decay, not on biases and norms (the original's AdamW: 0.01)", min=0.0)
    lr_scheduler_type: str = setting("linear", "a transformers scheduler name", aliases=["--lr_scheduler"])
    warmup_steps: float = setting(0, "linear warmup: optimizer steps, or below 1 a share of them (transformers' rule)",
                                 min=0, converted_aliases={"--warmup_ratio": warmup_ratio})
    bf16: bool = setting(False, "bf16 autocast (fp32 master weights)", setting_aliases={"--dtype": DTYPE_FLAGS})
    seed: int = setting(901, "seed of every stage (the original's 901)", aliases=["-seed"])
    logging_steps: float = setting(10, "log every N optimizer steps")
    save_steps: float = setting(0, "checkpoint (model, optimizer, scheduler, RNG) every N optimizer steps; 0: at every "
                                  "validation; -1 (or save_strategy 'no'): never")
    do_train: bool = setting(True, "train (False: only evaluate the model)", aliases=["-t", "--train"])
    do_predict: bool = setting(True, "evaluate the best model on the test split at the end", no_aliases=["--no_test"])
    eval_on_start: bool = setting(False, "validate the starting model first; a checkpoint must then beat it",
                                 aliases=["-ev_b", "--eval_in_beginning"])
    remove_unused_columns: bool = setting(False, "kept False: the stages' columns reach the loss")

    # ------------------------------------------------------------------------------------ model
    model_name: str | None = setting(None, "pi_ref: hub id or path (the trainer's model= gives it too)",
                                    aliases=["-m", "--model_name_or_path"])
    tokenizer_name: str | None = setting(None, "tokenizer, when not the model's", aliases=["-mt", "--model_tokenizer"])
    adapter_path: str | None = setting(None, "start from (and train) this peft adapter")
    disable_dropout: bool = setting(True, DISABLE_DROPOUT_HELP, no_aliases=["--keep_dropout"])
    max_prompt_length: int = setting(512, "prompt tokens kept (the last ones)", min=1)
    max_resp_length: int = setting(128, "response tokens (training, and generation unless --max_new_tokens)",
                                  aliases=["-ml"], min=1)

    # ------------------------------------------------------------------------- task and reward
    algorithm: str = setting("nll", "objective", choices=tuple(TABLE), aliases=["-algo", "--learning_algorithm"])
    task_name: str | None = setting(None, "the task's name (a paper task, hh, or any)", aliases=["-tn"])
    reward: str | None = setting(None, "reward spec scoring generations: 'module:function', 'file.py:function', "
                                       "'hf:MODEL#softmax[1]', 'text:...', a weighted sum 'a=...+0.5*b=...', a .json "
                                       "file; 'none': the gold NLL selects the best model")
    save_dir: str | None = setting(None, "where the best model is saved (default OUTPUT/model)", aliases=["-s"])
    cache_dir: str | None = setting(None, "the stages' caches (default OUTPUT/cache)", aliases=["-cd"])
    stage_cache: bool = setting(True, "reuse the stages' caches (reference pass, value head, generations); --no_cache "
                               "recomputes them", no_aliases=["--no_cache"])

    # -------------------------------------------------------------------------------- objective
    ppo_clip: float | None = setting(0.9, "clip importance weights to [1-c, 1+c] (the paper's 0.9); 0: weight 1; "
                                    "none: unclipped", min=0.0, max=1.0, aliases=["-c"], given_sets="ppo_clip_given")
    ppo_clip_given: bool = field(default=False, compare=False, metadata={
        "help": "the user set ppo_clip (a_lol_kl refuses a clip then)", "hidden_field": True})
    kl_beta: float | None = setting(None, "a_lol_kl's beta (None: 0.1)", aliases=["-b"], min=0.0)
    kl_estimator: str = setting("k1", "a_lol_kl's KL estimate: k1 the paper's beta*(L_ref - L_theta)",
                               choices=KL_ESTIMATORS)
    gold_floor: float = setting(0.1, "r_gold's lower bound on token probabilities", min=0.0)
    group_size: int = setting(1, "grouped algorithms (pro): candidates per prompt, consecutive rows")
    sft_weight: float = setting(0.05, "grouped algorithms: weight of the SFT term")
    sampling_strategy: str | None = setting(None, "none: good_priority for A-LoL, uniform otherwise (-ts: "
                                            "good_priority for any algorithm; the original's None, uniform, is also "
                                            "accepted)", choices=(*STRATEGIES, "None", "none"),
                                            const_aliases={"-ts": "good_priority", "--train_sampling": "good_priority"})
    length_grouping: bool = setting(True, "batches of rows of similar length", no_aliases=["--no_length_grouping"])
    packing: str = setting("auto", "pack rows without padding: auto (when provably exact), on, off",
                          choices=("auto", "on", "off"))

    # ---------------------------------------------------------------------------- value estimate
    value_epochs: int = setting(20, "value-head epochs (the most the cross-validation may pick)", min=1,
                               aliases=["-a2c_n", "--a2c_n_value_head_epochs"])
    value_learning_rate: float = setting(1e-3, "value-head learning rate", min=0.0)
    value_folds: int = setting(5, "folds of the value head's cross-validation over the validation prompts", min=3)
    value_source: str = setting("generations", "V(x)'s targets: rewards of pi_ref's generations on the validation "
                               "prompts (the paper) or the validation records' stored rewards; group: no V(x), the "
                               "baseline of a row is the mean reward of the other logged responses to its prompt (rows "
                               "with the same prompt text; RLOO's leave-one-out baseline, offline)",
                               choices=VALUE_SOURCES)
    group_singletons: str = setting("generations", "value_source group, a prompt with a single response: A = R - V(x), "
                                   "V(x) fit on the validation prompts from pi_ref's generations (generations) or the "
                                   "validation records' rewards (data), or refuse the run naming the row (refuse)",
                                   choices=GROUP_SINGLETONS)
    value_samples: int = setting(1, "generations per validation prompt for V(x)'s targets (1: the validation decoding)")
    value_head: str = setting("attention", "attention (the original's) or ridge", choices=("attention", "ridge"))

    # ----------------------------------------------------------------------- validation, test
    val_log_frequency: int = setting(2, "validations per epoch, evenly spaced (when eval_strategy is 'no')",
                                    aliases=["-vf"], min=1)
    step_scale_rows: int | None = setting(None, "with max_steps and priority sampling: scale steps by positive rows / "
                                                "this")
    max_val_examples: int | None = setting(None, "validate on the first N validation rows only", min=1)
    generation: GenerationSettings = setting(GenerationSettings(), "decoding of validation and test generations",
                                            flatten="")

    def complete(self) -> None:
        if self.generation.max_new_tokens is None:
            self.generation = dataclasses.replace(self.generation, max_new_tokens=self.max_resp_length)
        self.save_dir = self.save_dir or str(Path(self.output_dir) / "model")
        self.cache_dir = self.cache_dir or str(Path(self.output_dir) / "cache")
        if self.algorithm not in TABLE:
            raise ConfigError(f"unknown algorithm '{self.algorithm}' (expected one of {', '.join(TABLE)})")
        # the paper's default; an explicit "uniform" (or the original's "None") stays
        if self.sampling_strategy is None:
            self.sampling_strategy = "good_priority" if self.uses_advantage else "uniform"
        self.sampling_strategy = canonical_strategy(self.sampling_strategy)
        if self.spec.kl and self.kl_beta is None:
            self.kl_beta = 0.1

    def validate(self) -> None:
        super().validate()
        if (self.algorithm in GROUPED_ALGORITHMS) != (self.group_size > 1):
            raise ConfigError(f"group_size {self.group_size} with '{self.algorithm}': the grouped algorithms "
                              f"({', '.join(GROUPED_ALGORITHMS)}) need >= 2 candidates per prompt, the others 1")
        if self.spec.grouped and self.sampling_strategy != "uniform":
            raise ConfigError(f"{self.algorithm} ranks candidates inside each prompt: use sampling strategy uniform")
        if self.sampling_strategy not in STRATEGIES:
            raise ConfigError(f"unknown sampling strategy '{self.sampling_strategy}' "
                              f"(expected one of {', '.join(STRATEGIES)})")
        if self.sampling_strategy != "uniform" and self.spec.weight is None:
            raise ConfigError("priority sampling needs rewards or advantages: not available for -algo nll")
        if self.kl_beta is not None and not self.spec.kl:
            raise ConfigError(f"--kl_beta is only used by a_lol_kl, not by '{self.algorithm}'")
        if self.spec.kl and self.ppo_clip_given and self.ppo_clip:
            raise ConfigError("a_lol_kl has no importance weight to clip: use --ppo_clip 0 (or leave it out) with "
                              "--kl_beta")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown KL estimator '{self.kl_estimator}' "
                              f"(expected one of {', '.join(KL_ESTIMATORS)})")
        if self.ppo_clip is not None and not 0 <= self.ppo_clip < 1:
            raise ConfigError(f"--ppo_clip must be in [0, 1), got {self.ppo_clip}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                     "val_log_frequency", "max_resp_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.packing not in ("auto", "on", "off"):
            raise ConfigError(f"--packing must be auto, on or off, got '{self.packing}'")
        if self.value_samples < 1:
            raise ConfigError(f"--value_samples must be >= 1, got {self.value_samples}")
        if self.value_samples > 1 and self.value_fit_source == "data":
            raise ConfigError("--value_samples > 1 samples pi_ref's generations: not with --value_source data "
                              "(nor --group_singletons data)")
        if self.value_folds < 3:
            raise ConfigError(f"--value_folds must be >= 3 (nested cross-validation), got {self.value_folds}")
        if self.value_head not in ("attention", "ridge"):
            raise ConfigError(f"--value_head must be attention or ridge, got '{self.value_head}'")
        if self.value_source not in VALUE_SOURCES:
            raise ConfigError(f"--value_source must be one of {', '.join(VALUE_SOURCES)}, got '{self.value_source}'")
        if self.group_singletons not in GROUP_SINGLETONS:
            raise ConfigError(f"--group_singletons must be one of {', '.join(GROUP_SINGLETONS)}, "
                              f"got '{self.group_singletons}'")
        if self.num_train_epochs < 0:
            raise ConfigError(f"--num_train_epochs must be >= 0, got {self.num_train_epochs}")
        check_output_paths({"output folder": self.output_dir, "cache folder": self.cache_dir},
                           self.save_dir if self.do_train else None,  # evaluating only: nothing is saved
                           {"starting model": self.model_name, "adapter": self.adapter_path})

    # ------------------------------------------------------------------------------ derived
    @property
    def spec(self) -> Algorithm:
        """The algorithm's entry in :data:`lolrl.engine.losses.TABLE`."""
        return TABLE[self.algorithm]

    @property
    def uses_reference(self) -> bool:
        return self.spec.reference

    @property
    def uses_advantage(self) -> bool:
        return self.spec.weight == "advantage"

    @property
    def value_fit_source(self) -> str | None:
        """What V(x) is fit to when one is fit: ``generations`` or ``data`` (``value_source``, or with ``group``
        the singletons' ``group_singletons``); None with ``group`` and ``refuse`` (no V(x) ever)."""
        source = self.group_singletons if self.value_source == "group" else self.value_source
        return source if source in ("generations", "data") else None

    @property
    def effective_clip(self) -> float | None:
        return self.ppo_clip if self.spec.clip else None

    @property
    def checkpoint_at_validation(self) -> bool:
        """``save_steps`` 0 (the default): a checkpoint at every validation, as the original saved there."""
        return self.save_strategy == "steps" and self.save_steps == 0
