"""Command line of ``train_generation_task_with_off_policy_PG.py``: the original's flags, plus new ones.

Everything is parsed and checked (flags, data files, reward spec) before any model loads; a
problem prints one line and exits with status 2.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lolrl.engine.config import DISABLE_DROPOUT_HELP, ConfigError, OfflineRLConfig
from lolrl.engine.data import load_task_dir
from lolrl.engine.generation import GenerationSettings
from lolrl.engine.losses import ALGORITHMS, KL_ESTIMATORS
from lolrl.engine.model_card import HubSettings
from lolrl.engine.modeling import DTYPES, LOGPROB_KERNEL_HELP, LOGPROB_KERNELS, LoraSettings, QuantizationSettings
from lolrl.engine.rewards import RewardSpecError, load_reward
from lolrl.engine.sampling import STRATEGIES, canonical_strategy
from lolrl.tasks.paper.tasks import is_paper_task, task_info
from lolrl.utils.cli import DataclassParser, default_of, ignored, setting
from lolrl.utils.errors import UserError, report_user_error

logger = logging.getLogger("lolrl")


_C = OfflineRLConfig  # defaults shared with the engine's config are read from it, never restated
_G = GenerationSettings
_L = LoraSettings
TASK_HELP = ("task name; a paper task (reddit_pos, reddit_neg, wow, faithdial, faithdial_wow, COMET; any case), "
             "scored by its built-in reward recipe unless --reward is given, or any name together with --reward")


def _model_flag(short: str, key: str | None) -> Any:
    from lolrl.tasks.paper.rewards import DEFAULT_MODELS

    return setting(None, f"default {DEFAULT_MODELS[key]}" if key else "unused by these tasks (accepted)",
                   aliases=[short])


@dataclass
class GenerationTaskArguments(HubSettings, QuantizationSettings):
    """Offline policy-gradient training (A-LoL and baselines) of a language model on (prompt, response, reward) data."""

    # data and task
    input_dir: str = setting(help="folder with train.jsonl, val.jsonl, test.jsonl", aliases=["-i"])
    task_name: str = setting(help=TASK_HELP, aliases=["-tn"])
    model_name: str = setting(help="pi_ref: hub id or path (an NLL-trained model)", aliases=["-m"])
    output_dir: str = setting(help="logs, statistics, results and plots", aliases=["-o"])
    reward: str | None = setting(None, "reward spec scoring generations: 'module:function', 'file.py:function', "
                                       "'hf:MODEL#softmax[1]', a weighted sum 'a=...+0.5*b=...', a .json file, or "
                                       "'none' (then checkpoints are selected by the gold NLL)")
    use_datasets: bool = setting(False, "read the JSON Lines files through `datasets`")
    max_val_examples: int | None = setting(None, "validate on the first N val rows only", min=1)
    # model
    model_tokenizer: str | None = setting(None, "tokenizer, when not the model's", aliases=["-mt"])
    save_dir: str | None = setting(None, "where the best model is saved (default OUTPUT/model)", aliases=["-s"])
    cache_dir: str | None = setting(None, "reference/value/advantage caches (default OUTPUT/cache)", aliases=["-cd"])
    no_cache: bool = setting(False, "recompute every cached stage")
    dtype: str = setting("fp32", "parameter dtype", choices=DTYPES)
    bf16: bool = setting(False, "same as --dtype bf16")
    fp16: bool = setting(False, "same as --dtype fp16")
    lora_r: int = setting(default_of(_L, "r"), "LoRA rank; 0 trains all weights", min=0)
    lora_alpha: float = setting(default_of(_L, "alpha"), "LoRA alpha")
    lora_dropout: float = setting(default_of(_L, "dropout"), "LoRA dropout", min=0.0, max=1.0)
    lora_target_modules: str | None = setting(None, "comma-separated module names")
    adapter_path: str | None = setting(None, "start from (and train) this peft adapter")
    gradient_checkpointing: bool = setting(False, "trade compute for memory")
    load_in_4bit: bool = setting(False, "QLoRA: quantise the frozen base to 4-bit (CUDA + bitsandbytes; plain LoRA "
                                        "otherwise), as --quant_type, --double_quant, --compute_dtype and "
                                        "--prepare_kbit_training say")
    max_resp_length: int = setting(default_of(_C, "max_resp_length"), "response tokens (train and generation)",
                                   aliases=["-ml"], min=1)
    max_prompt_length: int = setting(default_of(_C, "max_prompt_length"), "prompt tokens kept (the last ones)", min=1)
    # algorithm
    learning_algorithm: str = setting(default_of(_C, "algorithm"), "objective", aliases=["-algo"], choices=ALGORITHMS)
    ppo_clip: float | None = setting(default_of(_C, "ppo_clip"), "clip importance weights to [1-c, 1+c] (the "
                                     "paper's 0.9); 0 gives weight 1, 'none' leaves them unclipped",
                                     aliases=["-c"], min=0.0)
    kl_beta: float | None = setting(None, "beta of a_lol_kl (default 0.1)", aliases=["-b"], min=0.0)
    kl_estimator: str = setting(default_of(_C, "kl_estimator"), "KL estimate of a_lol_kl; k1 is the paper's "
                                "beta*(L_ref - L_theta), k3 Schulman's", choices=KL_ESTIMATORS)
    gold_floor: float = setting(default_of(_C, "gold_floor"), "R-GOLD lower bound on token probabilities", min=0.0)
    train_sampling: bool = setting(False, "priority sampling (default on for A-LoL; turns it on for wbc/r_gold/r_lol)",
                                   aliases=["-ts"])
    sampling_strategy: str | None = setting(None, "default: good_priority for a_lol*, uniform otherwise (the "
                                                  "original's None, also accepted)",
                                            choices=(*STRATEGIES, "None", "none"))
    a2c_n_value_head_epochs: int = setting(default_of(_C, "value_epochs"), "value-head epochs", aliases=["-a2c_n"],
                                           min=1)
    value_learning_rate: float = setting(default_of(_C, "value_learning_rate"), "value-head learning rate", min=0.0)
    value_folds: int = setting(default_of(_C, "value_folds"), "folds of the value head's cross-validation over the "
                               "validation prompts (its epoch count and its reported R^2)", min=3)
    value_source: str = setting(default_of(_C, "value_source"), "V(x) fits rewards of pi_ref's generations on val "
                                "(the paper) or the val data's stored rewards", choices=("generations", "data"))
    value_samples: int = setting(default_of(_C, "value_samples"), "V(x) targets: 1 = reward of pi_ref's output with "
                                 "the validation decoding (the original); K > 1 = mean reward of K sampled outputs "
                                 "per validation prompt", min=1)
    value_head: str = setting(default_of(_C, "value_head"), "V(x)'s head: attention (the original's attention "
                              "pooling, gradient steps) or ridge (closed-form ridge regression on mean-pooled "
                              "states)", choices=("attention", "ridge"))
    reward_function: str | None = ignored(None, "parsed, never read by the original", aliases=["-r"])
    baseline_update_threshold: float | None = setting(None, "refused: the reference policy stays fixed, as in the "
                                                            "paper's objective", aliases=["-but"])
    # training
    train: bool = setting(False, "train; without it only evaluate the model at -s/-m", aliases=["-t"])
    n_epochs: int = setting(int(default_of(_C, "num_train_epochs")), "epochs", aliases=["-e"], min=0)
    max_steps: int = setting(default_of(_C, "max_steps"), "stop after this many optimizer steps (-1: the epochs)")
    batch_size: int = setting(default_of(_C, "per_device_train_batch_size"), "per-process batch size", aliases=["-bs"], min=1)
    accumulation_steps: int = setting(default_of(_C, "gradient_accumulation_steps"), "batches per optimizer step",
                                      aliases=["-as"], min=1)
    learning_rate: float = setting(default_of(_C, "learning_rate"), "learning rate", aliases=["-lr"], min=0.0)
    optim: str = setting(default_of(_C, "optim"), "a transformers optimizer name (the original: AdamW)")
    adam_beta1: float = setting(default_of(_C, "adam_beta1"), "Adam beta1")
    adam_beta2: float = setting(default_of(_C, "adam_beta2"), "Adam beta2")
    adam_epsilon: float = setting(default_of(_C, "adam_epsilon"), "Adam epsilon (the original's 1e-8)")
    weight_decay: float = setting(default_of(_C, "weight_decay"), "weight decay (not on biases and norms)", min=0.0)
    max_grad_norm: float = setting(default_of(_C, "max_grad_norm"), "gradient-norm clip", min=0.0)
    warmup_ratio: float = setting(0.0, "share of steps warming up", min=0.0, max=1.0)
    lr_scheduler: str = setting(str(default_of(_C, "lr_scheduler_type")), "a transformers scheduler name")
    disable_dropout: bool = setting(default_of(_C, "disable_dropout"), DISABLE_DROPOUT_HELP,
                                    no_aliases=["--keep_dropout"])
    no_length_grouping: bool = setting(False, "batches in data order instead of grouped by length")
    packing: str = setting(default_of(_C, "packing"), "pack a batch's rows into one sequence without padding; auto: "
                           "only with a flash-attention kernel, and only if exact on this model",
                           choices=("auto", "on", "off"))
    logprob_kernel: str = setting(default_of(_C, "logprob_kernel"), LOGPROB_KERNEL_HELP, choices=LOGPROB_KERNELS)
    seed: int = setting(default_of(_C, "seed"), "random seed", aliases=["-seed"])
    save_steps: int = setting(int(default_of(_C, "save_steps")), "checkpoint (model/adapter, optimizer, scheduler, sampler, "
                              "RNG) every N optimizer steps; 0: at every validation; -1: never")
    keep_checkpoints: int = setting(default_of(_C, "save_total_limit"), "how many checkpoints to keep", min=1)
    resume: str = setting(default_of(_C, "resume"), "continue from the latest checkpoint in OUTPUT/checkpoints: "
                          "auto (whenever one exists), must (--resume alone) or never (--no_resume)",
                          choices=("auto", "must", "never"), const="must", no_aliases=["--no_resume"],
                          no_value="never")
    stop_after_steps: int = setting(default_of(_C, "stop_after_steps"), "stop, checkpointed, after this many "
                                    "optimizer steps (e.g. to fit a batch job's time limit); the same command resumes")
    logging_steps: int = setting(int(default_of(_C, "logging_steps")), "log every N optimizer steps", min=1)
    report_to: str = setting(default_of(_C, "report_to"),
                             "trackers (the Trainer's report_to): tensorboard, wandb, ... or none")
    # validation and generation
    eval_in_beginning: bool = setting(False, "validate the starting model first; a checkpoint must then beat it",
                                      aliases=["-ev_b"])
    val_batch_size: int = setting(default_of(_C, "per_device_eval_batch_size"), "validation batch size", aliases=["-v_bs"], min=1)
    val_log_frequency: int = setting(default_of(_C, "val_log_frequency"), "validations per epoch", aliases=["-vf"],
                                     min=1)
    num_beams: int = setting(default_of(_G, "num_beams"), "beams", min=1)
    repetition_penalty: float = setting(default_of(_G, "repetition_penalty"), "repetition penalty")
    do_sample: bool = setting(False, "sample instead of beam search")
    temperature: float = setting(default_of(_G, "temperature"), "sampling temperature", min=0.0)
    top_p: float = setting(default_of(_G, "top_p"), "nucleus sampling", min=0.0, max=1.0)
    top_k: int = setting(default_of(_G, "top_k"), "top-k sampling (0: no top-k cut)", min=0)
    no_test: bool = setting(False, "skip the final test-set evaluation")
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

    given_flags: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.dtype = "bf16" if self.bf16 else "fp16" if self.fp16 else self.dtype
        self.bf16 = self.fp16 = False  # folded into dtype (a YAML dump of these settings reads back equal)


def build_parser() -> DataclassParser:
    return DataclassParser(GenerationTaskArguments, description=__doc__)


def parse_args(argv: list[str] | None = None) -> GenerationTaskArguments:
    return build_parser().parse_one(argv)


def config_from_args(args: GenerationTaskArguments) -> OfflineRLConfig:
    if args.baseline_update_threshold is not None:
        raise ConfigError("--baseline_update_threshold is not supported: the reference policy stays fixed, "
                          "as in the paper's objective")
    sampling = None if args.sampling_strategy is None else canonical_strategy(args.sampling_strategy)  # None: uniform
    if sampling is None and args.train_sampling:
        sampling = "good_priority"
    generation = GenerationSettings(max_new_tokens=args.max_resp_length, num_beams=args.num_beams,
                                    repetition_penalty=args.repetition_penalty, do_sample=args.do_sample,
                                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                        target_modules=args.lora_target_modules)
    clip_given = "ppo_clip" in args.given_flags
    model_name = args.model_name
    if not args.train and args.save_dir and Path(args.save_dir).is_dir():
        model_name = args.save_dir  # the original evaluates the saved model when -t is absent
    return OfflineRLConfig(
        model_name=model_name, output_dir=args.output_dir, algorithm=args.learning_algorithm,
        tokenizer_name=args.model_tokenizer, save_dir=args.save_dir, cache_dir=args.cache_dir,
        stage_cache=not args.no_cache, task_name=task_info(args.task_name).name,
        reward=None if args.reward in (None, "none") else args.reward,
        max_prompt_length=args.max_prompt_length, max_resp_length=args.max_resp_length,
        num_train_epochs=args.n_epochs, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation_steps,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        optim=args.optim, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
        warmup_steps=min(args.warmup_ratio, 1 - 1e-9), lr_scheduler_type=args.lr_scheduler, bf16=args.dtype == "bf16",
        fp16=args.dtype == "fp16", activation_checkpointing=args.gradient_checkpointing,
        disable_dropout=args.disable_dropout, seed=args.seed,
        ppo_clip=args.ppo_clip, ppo_clip_given=clip_given, kl_beta=args.kl_beta,
        kl_estimator=args.kl_estimator, gold_floor=args.gold_floor, sampling_strategy=sampling,
        value_epochs=args.a2c_n_value_head_epochs, value_learning_rate=args.value_learning_rate,
        value_folds=args.value_folds, value_source=args.value_source,
        value_samples=args.value_samples, value_head=args.value_head, per_device_eval_batch_size=args.val_batch_size,
        val_log_frequency=args.val_log_frequency, eval_on_start=args.eval_in_beginning,
        max_val_examples=args.max_val_examples, generation=generation, do_train=args.train,
        do_predict=not args.no_test, lora=lora, adapter_path=args.adapter_path, logging_steps=args.logging_steps,
        report_to=args.report_to, length_grouping=not args.no_length_grouping, packing=args.packing,
        logprob_kernel=args.logprob_kernel, save_strategy="no" if args.save_steps < 0 else "steps",
        save_steps=max(args.save_steps, 0), save_total_limit=args.keep_checkpoints, resume=args.resume,
        stop_after_steps=args.stop_after_steps, load_in_4bit=args.load_in_4bit,
        quantization=QuantizationSettings.of(args), **HubSettings.of(args).__dict__)


def _setup_logging(output_dir: str, is_main: bool) -> None:
    """Log the library to stderr and OUTPUT/train_output.log; calling it again replaces both handlers."""
    library = logging.getLogger("lolrl")
    for handler in [h for h in library.handlers if getattr(h, "_lolrl", False)]:
        library.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if is_main:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "train_output.log"))
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler._lolrl = True
        handler.setFormatter(formatter)
        library.addHandler(handler)
    library.setLevel(logging.INFO if is_main else logging.WARNING)


def _check_reward_given(args: GenerationTaskArguments) -> None:
    if args.reward is not None or is_paper_task(args.task_name):
        return  # a paper task without --reward uses its built-in recipe
    raise ConfigError(f"task '{args.task_name}' is not a paper task: pass --reward SPEC "
                      "(or --reward none to select checkpoints by gold NLL)")


def _paper_task_reward(args: GenerationTaskArguments, config: OfflineRLConfig):
    """The paper task's recipe (lolrl.tasks.paper.rewards), classifiers from -cm -ucm -dcm -om -fcm -ccm and the
    TF-IDF weights from the input folder; ``config.reward`` records its components."""
    from lolrl.tasks.paper.rewards import TFIDF_FILE, PaperRewardModels, build_task_reward

    task = task_info(args.task_name)
    models = PaperRewardModels.from_args(args, batch_size=config.per_device_eval_batch_size)
    try:
        reward = build_task_reward(task.name, models, Path(args.input_dir) / TFIDF_FILE
                                   if task.name != "comet" else None)
    except RewardSpecError as exc:
        raise RewardSpecError(f"task '{task.name}': built-in reward recipe: {exc} (or pass --reward SPEC)") from None
    config.reward = " + ".join(f"{c.name}={c.source}" for c in reward.components)
    return reward


def _apply_task_settings(args: GenerationTaskArguments, config: OfflineRLConfig, data) -> None:
    """COMET, as the original: validate on a seeded sample of 10,000 val rows; stop generating at '.'."""
    task = task_info(args.task_name)
    if task.val_sample and args.max_val_examples is None and len(data.val) > task.val_sample:
        data.val = random.Random(config.seed).sample(data.val, task.val_sample)
        logger.info("task %s: validating on a random sample of %d val rows", task.name, task.val_sample)
    if task.stop_texts and not config.generation.stop_token_ids:
        from lolrl.engine.modeling import load_tokenizer

        tokenizer = load_tokenizer(config.model_name, config.tokenizer_name)
        for text in task.stop_texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                config.generation.stop_token_ids.append(ids[0])


def run(args: GenerationTaskArguments) -> tuple[dict, OfflineRLConfig, bool]:
    """Check everything cheap first (flags, reward spec, every data row), then load models and run."""
    config = config_from_args(args)
    _check_reward_given(args)
    if args.reward_function is not None:
        logger.warning("-r/--reward_function is ignored (the original code ignored it too)")
    data = load_task_dir(args.input_dir, task_info(args.task_name).split_files,
                         require_train_reward=config.do_train and config.algorithm != "nll",
                         need_test=config.do_predict, use_datasets=args.use_datasets)
    if args.reward is None and is_paper_task(args.task_name):
        reward = _paper_task_reward(args, config)
    else:
        reward = load_reward(config.reward) if config.reward else None
    _apply_task_settings(args, config, data)
    from lolrl.engine.trainer import OfflineRLTrainer

    _setup_logging(config.output_dir, is_main=int(os.environ.get("RANK", "0")) == 0)  # before models load
    trainer = OfflineRLTrainer(args=config, data=data, reward=reward, task=task_info(args.task_name))
    return trainer.run(), config, trainer.is_main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results, config, is_main = run(args)
    except UserError as exc:  # one line, status 2; anything else is a bug and keeps its traceback
        return report_user_error(exc)
    if is_main and results:
        from lolrl.engine.evaluation import format_markdown_table

        print(format_markdown_table(results))
        print(f"outputs in {Path(config.output_dir).resolve()}; best model in {Path(config.save_dir).resolve()}")
    return 0
