"""The configuration of one offline policy-gradient run (all algorithms share it, TRL style)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from lolrl.engine.generation import GenerationSettings
from lolrl.engine.losses import GROUPED_ALGORITHMS, KL_ESTIMATORS, TABLE, Algorithm
from lolrl.engine.model_card import HubSettings
from lolrl.engine.modeling import DTYPES, LoraSettings, QuantizationSettings, check_logprob_kernel
from lolrl.engine.runtime import check_report_to
from lolrl.engine.sampling import STRATEGIES, canonical_strategy
from lolrl.utils.errors import ConfigError
from lolrl.utils.lock import check_output_paths

__all__ = ["ConfigError", "OfflineRLConfig", "DISABLE_DROPOUT_HELP"]

# The --disable_dropout flag of every training script (its default: OfflineRLConfig.disable_dropout).
DISABLE_DROPOUT_HELP = ("dropout off (LoRA's too) in the model trained, for every algorithm alike (and pi_ref's own NLL run): "
                        "the importance weight is 1 at step 0; --keep_dropout (or --disable_dropout False) keeps "
                        "the model's dropout for every algorithm, as the original")


@dataclass
class OfflineRLConfig:
    """Every setting of a run. Defaults follow the paper where the original code contradicts it:
    importance weights clipped to [1-0.9, 1+0.9], priority sampling on for A-LoL, a finite
    ``kl_beta`` for ``a_lol_kl``, dropout off for every algorithm; see the README's table of defaults."""

    model_name: str | None = None  # None: the trainer's model= gives it
    output_dir: str | None = None  # required (None is refused: it is here for OfflineRLConfig(output_dir=...))
    algorithm: str = "nll"
    tokenizer_name: str | None = None
    save_dir: str | None = None  # default: {output_dir}/model
    cache_dir: str | None = None  # default: {output_dir}/cache
    use_cache: bool = True
    task_name: str | None = None
    reward: str | None = None  # reward spec, see lolrl.engine.rewards

    # lengths
    max_prompt_length: int = 512
    max_resp_length: int = 128

    # optimisation
    n_epochs: int = 4
    max_steps: int = -1  # optimizer steps; -1 = the epochs decide
    batch_size: int = 16
    accumulation_steps: int = 1
    learning_rate: float = 2e-5
    optim: str = "adamw_torch"  # a transformers optimizer name (lolrl.engine.optim); the original generation script's
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8  # the original generation script's AdamW(eps=1e-8, weight_decay=0.01)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    # dropout off in the model trained, for every algorithm alike (and pi_ref's own NLL run): the importance
    # weight is then exactly 1 at step 0, as TRL's DPO, KTO and reward trainers; False keeps the model's dropout
    # (the original's behaviour, for every algorithm)
    disable_dropout: bool = True
    seed: int = 901

    # objectives
    ppo_clip: float | None = 0.9
    kl_beta: float | None = None  # a_lol_kl only; None -> 0.1
    kl_estimator: str = "k1"  # the paper's beta * (L_ref - L_theta); k3 an option
    gold_floor: float = 0.1
    # grouped algorithms (pro): each training item is `group_size` consecutive rows, candidates for one prompt
    group_size: int = 1
    sft_weight: float = 0.05
    sampling_strategy: str | None = None  # None: good_priority for A-LoL, None (uniform) otherwise

    # value estimate
    value_epochs: int = 20
    value_learning_rate: float = 1e-3
    value_folds: int = 5  # k-fold cross-validation over the validation prompts: V(x)'s epochs and its report
    # generations: V(x) fits the reward of pi_ref's generations on the validation prompts (the paper);
    # data: V(x) fits the stored rewards of the validation records' own responses (no reward model needed)
    value_source: str = "generations"
    # generations per validation prompt for V(x)'s targets: 1 = pi_ref's output with the validation decoding
    # (the original: one beam-search output); K > 1 = K sampled outputs (temperature 1 unless the decoding
    # samples), V(x) fit to their mean reward, an estimate of E_{pi_ref}[R | x]
    value_samples: int = 1
    # attention: the original's attention-pooling head, trained by gradient steps for the cross-validated epoch count;
    # ridge: closed-form ridge regression on the mean-pooled states, its penalty chosen by leave-one-out error
    value_head: str = "attention"

    # validation, generation and evaluation
    val_batch_size: int = 64
    val_log_frequency: int = 2  # validations per epoch (evenly spaced), as the original
    eval_steps: int = 0  # > 0: validate every N optimizer steps instead of val_log_frequency per epoch
    step_scale_rows: int | None = None  # with max_steps and priority sampling: scale steps by positive rows / this
    eval_in_beginning: bool = False
    max_val_examples: int | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    do_train: bool = True
    do_test: bool = True

    # checkpoints: 0 = at every validation, N > 0 = every N optimizer steps, -1 = never
    save_steps: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto: continue from OUTPUT/checkpoints when one exists; must; never
    stop_after_steps: int = -1  # stop (checkpointed) after this many optimizer steps; the next run resumes
    max_nonfinite_steps: int = 3  # optimizer steps in a row with a NaN/inf loss or gradient before the run stops

    lora: LoraSettings = field(default_factory=LoraSettings)
    adapter_path: str | None = None
    load_in_4bit: bool = False  # QLoRA: NF4 base on CUDA (plain LoRA without CUDA, with a warning)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)  # how load_in_4bit quantises
    logging_steps: int = 10
    report_to: str = "none"  # trackers (Accelerate's): tensorboard (event files under OUTPUT/lolrl), wandb, ...
    hub: HubSettings = field(default_factory=HubSettings)  # --push_to_hub: the save folder, with its card, at the end
    length_grouping: bool = True
    packing: str = "auto"  # auto: pack rows without padding when the model provably supports it; on; off
    # the output layer's log-probs: auto = Liger's fused kernel when installed on CUDA, else chunked; liger; chunked
    logprob_kernel: str = "auto"

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ConfigError("OfflineRLConfig needs an output_dir (where the run writes its results)")
        self.save_dir = self.save_dir or str(Path(self.output_dir) / "model")
        self.cache_dir = self.cache_dir or str(Path(self.output_dir) / "cache")
        if self.algorithm not in TABLE:
            raise ConfigError(f"unknown algorithm '{self.algorithm}' (expected one of {', '.join(TABLE)})")
        if self.sampling_strategy is None:
            self.sampling_strategy = "good_priority" if self.uses_advantage else "uniform"
        self.sampling_strategy = canonical_strategy(self.sampling_strategy)
        if self.spec.kl and self.kl_beta is None:
            self.kl_beta = 0.1
        self.validate()

    def validate(self) -> None:
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
            raise ConfigError("a_lol_kl has no importance weight to clip: use --ppo_clip 0 (or leave it out) with --kl_beta")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"unknown KL estimator '{self.kl_estimator}' (expected one of {', '.join(KL_ESTIMATORS)})")
        if self.ppo_clip is not None and not 0 <= self.ppo_clip < 1:
            raise ConfigError(f"--ppo_clip must be in [0, 1), got {self.ppo_clip}")
        from lolrl.engine.optim import optimizer_names

        if self.optim not in optimizer_names():
            raise ConfigError(f"--optim: unknown optimizer '{self.optim}' (expected a transformers optimizer name, "
                              "e.g. adamw_torch or paged_adamw_32bit)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{self.dtype}' (expected one of {', '.join(DTYPES)})")
        for name in ("batch_size", "accumulation_steps", "val_batch_size", "val_log_frequency", "max_resp_length",
                     "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.resume not in ("auto", "must", "never"):
            raise ConfigError(f"resume must be auto, must or never, got '{self.resume}'")
        if self.packing not in ("auto", "on", "off"):
            raise ConfigError(f"--packing must be auto, on or off, got '{self.packing}'")
        check_logprob_kernel(self.logprob_kernel)
        self.quantization.check()
        self.hub.check()
        check_report_to(self.report_to)
        if self.value_samples < 1:
            raise ConfigError(f"--value_samples must be >= 1, got {self.value_samples}")
        if self.value_samples > 1 and self.value_source == "data":
            raise ConfigError("--value_samples > 1 samples pi_ref's generations: not with --value_source data")
        if self.value_folds < 3:
            raise ConfigError(f"--value_folds must be >= 3 (nested cross-validation), got {self.value_folds}")
        if self.value_head not in ("attention", "ridge"):
            raise ConfigError(f"--value_head must be attention or ridge, got '{self.value_head}'")
        if self.value_source not in ("generations", "data"):
            raise ConfigError(f"--value_source must be generations or data, got '{self.value_source}'")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        check_output_paths({"output folder": self.output_dir, "cache folder": self.cache_dir},
                           self.save_dir if self.do_train else None,  # evaluating only: nothing is saved
                           {"starting model": self.model_name, "adapter": self.adapter_path})
        if self.n_epochs < 0:
            raise ConfigError(f"--n_epochs must be >= 0, got {self.n_epochs}")

    # Whether the user set --ppo_clip explicitly (the CLI sets this); the library default is 0.9.
    ppo_clip_given: bool = False

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
    def effective_clip(self) -> float | None:
        return self.ppo_clip if self.spec.clip else None

    def to_dict(self) -> dict:
        """Every setting (args.json, the trackers' hyper-parameters), the hub token hidden."""
        return {**asdict(self), "hub": self.hub.shown()}
