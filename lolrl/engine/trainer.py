"""The offline policy-gradient trainer: a ``transformers.Trainer`` for all eight algorithms.

As TRL's trainers, :class:`OfflineRLTrainer` subclasses ``transformers.Trainer`` and
:class:`~lolrl.engine.config.OfflineRLConfig` subclasses ``TrainingArguments``: the optimizer, the
schedule, accumulation, clipping, mixed precision, DDP / FSDP / DeepSpeed, checkpoint save and
resume, trackers and progress bars are the Trainer's. What lolrl adds:

1. the stages before training (:mod:`lolrl.engine.stages`), run once and cached: pi_ref's
   generations on the validation prompts, V(x), the reference pass, the advantages. They land as
   columns of the training dataset (``ref_logprobs``, ``advantage``, ``reward``), as TRL's DPO
   trainer precomputes reference log-probs;
2. ``compute_loss``: the one table of algorithms (:mod:`lolrl.engine.losses`);
3. the train sampler: priority sampling (probability proportional to A+, the epoch shortened to
   the positive share), deterministic per epoch, so a resumed run sees the same batches;
4. ``evaluate``: generate on the validation prompts and score with the reward; the task's metric
   (``metric_for_best_model``) selects the best model, saved to ``save_dir`` with a model card;
5. the trust guarantees (:mod:`lolrl.engine.callbacks`): the non-finite step guard, checkpoints
   sealed by a manifest and a run key and verified before resume (a damaged one falls back to the
   previous intact one), the folder lock, per-stage seeding, one-line user errors.
"""
from __future__ import annotations

import copy
import functools
import gc
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput

from lolrl.engine.callbacks import CheckpointSeal, StopAfterSteps, ValidationSchedule, nonfinite_guarded
from lolrl.engine.collation import Collator, TokenizedRow, Tokenizer, check_prompts_renderable
from lolrl.engine.config import ConfigError, OfflineRLConfig
from lolrl.engine.data import Record, TaskData, reward_matrix
from lolrl.engine.generation import with_stop_texts
from lolrl.engine.losses import compute_loss
from lolrl.engine.meteor import default_matcher
from lolrl.engine.model_card import offline_card, push_best, write_card
from lolrl.engine.modeling import (
    base_load_dtype,
    choose_logprob_kernel,
    choose_packing,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    model_is_encoder_decoder,
    numerics_key,
    response_logprobs,
    set_dropout,
)
from lolrl.engine.reference import reference_pass
from lolrl.engine.reports import (
    plot_loss_curves,
    plot_reward_distributions,
    plot_validation_curve,
    summarize_generations,
    write_results_table,
)
from lolrl.engine.rewards import reward_from_funcs
from lolrl.engine.runtime import end_trainer_run
from lolrl.engine.sampling import PrioritySampler
from lolrl.engine.stages import (  # noqa: F401 (advantage_statistics: re-exported)
    ReferenceStages,
    TrainingSignal,
    advantage_statistics,
    check_group_singletons,
)
from lolrl.engine.task import TaskInfo
from lolrl.engine.validation import BestModelKeeper, gold_texts
from lolrl.engine.value import MIN_VALUE_PROMPTS
from lolrl.utils import cache as cache_lib
from lolrl.utils.checkpoint import drop_log_tail, find_resumable, inject_fault, run_key
from lolrl.utils.finite import check_finite_state
from lolrl.utils.io import append_jsonl, atomic_write_json, write_jsonl
from lolrl.utils.lock import ensure_folder, hold_folders
from lolrl.utils.processes import decided_on_main
from lolrl.utils.seeding import seed_stage, stage_rng
from lolrl.utils.sharded import restore_trainable, shards_parameters, trainable_state

logger = logging.getLogger(__name__)

SPREAD_STATS = ("importance_weight", "raw_ratio")  # logged with their min and max over the window's rows too
# Scored tokens per pass of the output layer in the training loss. Its backward recomputes a chunk's logits and
# holds their softmax and gradient beside them (~4 [chunk, vocab] fp32 blocks at once): at the passes without
# gradient's 1024 tokens that was ~130 MB on GPT-2's 8000 words, and the training step's peak (the GPT-2
# benchmark: ~40 MB of peak RSS less with 256, issue 23).
TRAIN_LOGPROB_CHUNK_TOKENS = 256


def window_summary(window: dict[str, list[float]]) -> dict[str, float]:
    """A logging window's per-row statistics: the mean of each, and for the importance weight and the
    raw ratio also the smallest and largest row (``importance_weight_min``, ``raw_ratio_max``, ...)."""
    summary = {}
    for name, values in window.items():
        if values:
            summary[name] = float(np.mean(values))
            if name in SPREAD_STATS:
                summary[f"{name}_min"], summary[f"{name}_max"] = float(np.min(values)), float(np.max(values))
    return summary


class TrainingRows(torch.utils.data.Dataset):
    """The training items as the Trainer's data loader reads them: item ``i`` is row ``i`` (or, for the
    grouped algorithms, the ``group_size`` consecutive rows of group ``i``) with its stage columns, from a
    ``datasets.Dataset`` (Arrow) holding ``prompt_ids``, ``response_ids`` and the stages' ``reward``,
    ``advantage``, ``ref_logprobs`` and ``sft`` where the algorithm reads them."""

    def __init__(self, table, group_size: int = 1):
        self.table, self.size = table, group_size

    def __len__(self) -> int:
        return len(self.table) // self.size

    def __getitem__(self, item: int) -> list[dict]:
        return [self.table[item * self.size + k] for k in range(self.size)]


def training_table(rows: list[TokenizedRow], signal: TrainingSignal, path: Path):
    """The training rows and their stage columns as one Arrow file at ``path``, written row by row and read
    back memory-mapped (``datasets.Dataset.from_file``): the table is not held in RAM."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets.arrow_writer import ArrowWriter

    features = {"index": Value("int64"), "prompt_ids": Sequence(Value("int32")),
                "response_ids": Sequence(Value("int32"))}
    if signal.rewards is not None:
        features["reward"] = Value("float64")
    if signal.advantages is not None:
        features["advantage"] = Value("float64")
    if signal.ref_logprobs is not None:
        features["ref_logprobs"] = Sequence(Value("float32"))
    if signal.sft_rows is not None:
        features["sft"] = Value("bool")
    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(features=Features(features), path=str(path)) as writer:
        for i, row in enumerate(rows):
            entry = {"index": row.index, "prompt_ids": row.prompt_ids, "response_ids": row.response_ids}
            if signal.rewards is not None:
                entry["reward"] = float(signal.rewards[i])
            if signal.advantages is not None:
                entry["advantage"] = float(signal.advantages[i])
            if signal.ref_logprobs is not None:
                entry["ref_logprobs"] = signal.ref_logprobs[i].float().tolist()
            if signal.sft_rows is not None:
                entry["sft"] = bool(signal.sft_rows[i])
            writer.write(entry)
        writer.finalize()
    return Dataset.from_file(str(path))


class BatchCollator:
    """Training items -> the loss's batch: the model inputs (:class:`Collator`) and the stage columns."""

    def __init__(self, collator: Collator):
        self.collator = collator

    def __call__(self, items: list[list[dict]]) -> dict:
        rows = [row for item in items for row in item]
        batch = self.collator([TokenizedRow(r["index"], r["prompt_ids"], r["response_ids"]) for r in rows])
        if "reward" in rows[0]:
            batch["rewards"] = torch.tensor([r["reward"] for r in rows], dtype=torch.float32)
        if "advantage" in rows[0]:
            batch["advantages"] = torch.tensor([r["advantage"] for r in rows], dtype=torch.float32)
        if "ref_logprobs" in rows[0]:  # the policy's log-probs' [rows, longest response] layout
            batch["ref_logprobs"] = torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(r["ref_logprobs"], dtype=torch.float32) for r in rows], batch_first=True)
        if "sft" in rows[0]:
            batch["sft_rows"] = torch.tensor([r["sft"] for r in rows])
        return batch


class OfflineRLTrainer(ReferenceStages, Trainer):
    """Train with any of ``nll, wbc, r_gold, r_lol, a_lol, a_lol_ref_free, a_lol_seq, a_lol_kl`` (and the
    grouped ``pro``), TRL's way, on 🤗 ``datasets`` in prompt-completion form:

    >>> trainer = OfflineRLTrainer(model="path/to/nll_model", args=OfflineRLConfig(output_dir="out",
    ...                            algorithm="a_lol"), train_dataset=train, eval_dataset=val,
    ...                            reward_funcs=[fn1, fn2], reward_weights=[1.0, 0.5])
    >>> trainer.train()

    or on validated records (:func:`lolrl.engine.data.load_task_dir`) and a reward
    (:func:`lolrl.engine.rewards.load_reward`), as the scripts do:
    ``OfflineRLTrainer(args=config, data=data, reward=reward).run()``, which returns the final
    evaluation's tables.
    """

    def __init__(self, model: str | None = None, args: OfflineRLConfig | None = None, data: TaskData | None = None,
                 reward=None, *, train_dataset=None, eval_dataset=None, test_dataset=None, reward_funcs=None,
                 reward_weights=None, callbacks: list[TrainerCallback] | None = None, postprocess=None,
                 task: TaskInfo | None = None):
        args = self._args_of(model, args)
        if train_dataset is not None or eval_dataset is not None or test_dataset is not None:
            if data is not None:
                raise ConfigError("give the data once: data= (records) or train_dataset= / eval_dataset= (datasets)")
            data = TaskData.from_datasets(train_dataset if args.do_train else None, eval_dataset,
                                          test_dataset if args.do_predict else None,
                                          require_train_reward=args.algorithm != "nll")
        if data is None:
            raise ConfigError("no data: give train_dataset= and eval_dataset= (datasets), or data= (records)")
        if reward_funcs is not None or reward_weights is not None:
            if reward is not None:
                raise ConfigError("give the reward once: reward= or reward_funcs=")
            reward = reward_from_funcs(reward_funcs, reward_weights)
        if reward is not None and args.reward is None:  # args.json, the run key and the card say which reward
            args.reward = " + ".join(f"{c.weight:g}*{c.name}={c.source}" for c in reward.components)
        self.data, self.reward, self.postprocess = data, reward, postprocess  # postprocess: e.g. the HH stop rule
        self.task = task or TaskInfo(args.task_name)  # what the engine knows of the task
        if self.task.val_sample and args.max_val_examples is None and len(data.val) > self.task.val_sample:
            # e.g. COMET, as the original: validate on a seeded sample of its 10,000 val rows
            data.val = random.Random(args.seed).sample(data.val, self.task.val_sample)
            logger.info("task %s: validating on a random sample of %d val rows", self.task.name, self.task.val_sample)
        self._check_data(args, data, reward)
        self.output_dir = ensure_folder(args.output_dir, "output folder")
        tokenizer = load_tokenizer(args.model_name, args.tokenizer_name)
        # e.g. COMET's '.', HH's ' ###': generation ends there too
        args.generation = with_stop_texts(args.generation, tokenizer, self.task.stop_texts)
        for split, records in (("train", data.train), ("val", data.val), ("test", data.test)):
            if records:
                check_prompts_renderable(tokenizer, records, data.source(split))
        # METEOR's matching stages depend on what NLTK finds installed: say which, once, up front.
        logger.info("meteor_matching: %s", default_matcher().stages)
        self.keeper = BestModelKeeper(self.output_dir, args.save_dir,
                                      self.task.val_metric if reward is not None else "neg_nll_per_token")
        if args.metric_for_best_model is None:
            args.metric_for_best_model = self.keeper.metric
        elif args.metric_for_best_model.removeprefix("eval_") != self.keeper.metric:
            self.keeper.metric = args.metric_for_best_model.removeprefix("eval_")
        args.greater_is_better = True  # every validation measure is: higher is better
        if args.activation_checkpointing and args.activation_checkpointing_kwargs is None:
            args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = {"use_reentrant": False}
        from transformers import set_seed

        set_seed(args.seed)  # a new LoRA adapter's initialisation
        policy = self._load_policy(args, tokenizer)
        self.schedule, self.stop, self.seal = ValidationSchedule(self), StopAfterSteps(), CheckpointSeal(self)
        super().__init__(model=policy, args=args, data_collator=BatchCollator(self.collator),
                         eval_dataset=self.data.val,  # evaluate() generates on it (the Trainer only holds it)
                         processing_class=tokenizer, callbacks=[self.schedule, self.stop, self.seal,
                                                                *(callbacks or [])])
        self.tokenizer = tokenizer
        self.cache = cache_lib.Cache(args.cache_dir, enabled=args.stage_cache, accelerator=self.accelerator)
        self.logprob_kernel, why = choose_logprob_kernel(self.model, args.logprob_kernel, self.accelerator.device,
                                                         sharded=shards_parameters(self.accelerator))
        logger.info("log-probs: %s (%s)", self.logprob_kernel, why)
        self.best_state: dict[str, torch.Tensor] | None = None
        self._window: dict[str, list[float]] = {}
        self._step_losses: list[float] = []
        self._reuse: tuple | None = None  # pi_ref's validation generations, which are step 0's
        self.stage_seconds = {}

    @staticmethod
    def _args_of(model, args: OfflineRLConfig | None) -> OfflineRLConfig:
        """The run's settings (a copy: the run fills in its step budget and metric), with ``model=`` as their
        ``model_name``."""
        if args is None:
            raise ConfigError("no settings: give args=OfflineRLConfig(output_dir=..., ...)")
        if not isinstance(args, OfflineRLConfig):
            raise ConfigError(f"args= takes an OfflineRLConfig, got a {type(args).__name__}")
        args = copy.copy(args)
        if model is not None:
            if not isinstance(model, (str, Path)):
                raise ConfigError(f"model= takes a model folder or hub id, got a {type(model).__name__} "
                                  "(a loaded model object is not supported: save it with save_pretrained)")
            if args.model_name not in (None, str(model)):
                raise ConfigError(f"model={str(model)!r} and args.model_name={args.model_name!r}: give one")
            args.model_name = str(model)
            args.validate()  # the checks that read the starting model (a save folder inside it is refused)
        if not args.model_name:
            raise ConfigError("no model: give model= (or OfflineRLConfig(model_name=...))")
        return args

    @staticmethod
    def _check_data(args: OfflineRLConfig, data: TaskData, reward) -> None:
        val = data.val[: args.max_val_examples] if args.max_val_examples else data.val
        fits_value = args.uses_advantage
        if fits_value and args.value_source == "group":
            # V(x) only for the prompts with a single response (refused there with --group_singletons refuse)
            fits_value = bool(args.do_train and data.train
                              and check_group_singletons(data.train, args.group_singletons))
        if fits_value and reward is None and args.value_fit_source == "generations":
            raise ConfigError(f"{args.algorithm} fits a value estimate on scored generations: it needs a reward "
                              "(or --value_source data, to fit it on the validation records' stored rewards" +
                              ("; --group_singletons data or refuse, as the run's prompts with a single response "
                               "need V(x))" if args.value_source == "group" else ")"))
        if fits_value and args.value_fit_source == "data" and any(r.reward is None for r in val):
            raise ConfigError("--value_source data fits V(x) on the validation records' rewards: every validation "
                              "record needs one")
        if fits_value and args.do_train and len(val) < MIN_VALUE_PROMPTS:
            raise ConfigError(f"{args.algorithm} fits the value estimate on validation prompts: it needs at least "
                              f"{MIN_VALUE_PROMPTS}")
        if args.do_train and data.train and any(r.reward is None for r in data.train) and args.algorithm != "nll":
            raise ConfigError(f"{args.algorithm} needs a reward on every training row")

    @property
    def config(self) -> OfflineRLConfig:
        """The run's settings (``self.args``)."""
        return self.args

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ----------------------------------------------------------------------------------- set-up
    def training_precision(self):
        """The numerics of the training loss (the accelerator's autocast under bf16/fp16, nothing in fp32),
        for every pass whose output is compared with the policy's: pi_ref's log-probs, the prompt states V(x)
        is fit on and applied to, pi_ref's validation generations (reused as step 0's validation), every
        validation and the gold NLL. Not all of them call the model's forward (the output layer runs in
        chunks; peft's ``generate`` calls the base model's), so each enters it explicitly. pi_ref's log-probs
        in fp32 against a bf16 loss scattered the first-step importance weights (0.73 to 1.41 on SmolLM2 in
        issue 22's audit); in the loss's precision they are exactly 1 (tests/engine/test_precision.py)."""
        return self.accelerator.autocast()

    def _load_policy(self, args: OfflineRLConfig, tokenizer):
        # bf16/fp16 run under autocast. Full fine-tuning keeps fp32 master weights (as transformers' Trainer
        # does); with LoRA the frozen base is loaded in the low precision and the adapters stay fp32.
        dtype = base_load_dtype(args.dtype, args.lora, args.adapter_path, args.load_in_4bit)
        model = load_model(args.model_name, dtype=dtype, lora=args.lora, adapter_path=args.adapter_path,
                           load_in_4bit=args.load_in_4bit, quantization=args.quantization,
                           device_index=args.local_process_index)
        if args.disable_dropout:
            set_dropout(model, 0.0)
        if args.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.encoder_decoder = model_is_encoder_decoder(model)
        self.row_tokenizer = Tokenizer(tokenizer, self.encoder_decoder, args.max_prompt_length, args.max_resp_length)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(
            getattr(model, "base_model", None), "is_loaded_in_4bit", False)
        model = model if quantized else model.to(args.device)  # 4-bit weights are placed on load
        self.collator = Collator(tokenizer.pad_token_id, self.encoder_decoder,
                                 getattr(model.config, "decoder_start_token_id", None),
                                 pack=self._use_packing(args, model, tokenizer))
        return model

    def _use_packing(self, args: OfflineRLConfig, model, tokenizer) -> str | bool:
        """Packed rows (no padding) with a variable-length attention kernel; else length-grouped padding.
        The probe runs as training does (under autocast: flash kernels take bf16/fp16 only)."""
        mode = args.packing
        if mode == "on" and self.encoder_decoder:
            raise ConfigError("--packing on is for decoder-only models")
        probe = self.row_tokenizer((self.data.train or self.data.val)[:4])
        autocast = torch.autocast(args.device.type, dtype=torch.bfloat16 if args.bf16 else torch.float16,
                                  enabled=args.bf16 or args.fp16)
        with autocast:
            pack = choose_packing(model, probe, tokenizer.pad_token_id, mode,
                                  tolerance=1e-4 if args.dtype == "fp32" else 1e-3)
        if mode == "on" and not pack:
            raise ConfigError(f"--packing on: '{args.model_name}' does not give the same log-probs packed "
                              "as padded (its attention ignores position-id packing); use --packing auto or off")
        logger.info("batches: %s", f"packed without padding ({pack}; verified exact on this model)" if pack
                    else "padded, grouped by length")
        return pack

    def _model_key(self, scoring: bool = False) -> dict:
        """What pi_ref's numbers depend on (:func:`lolrl.engine.modeling.numerics_key`); ``scoring``: a
        pass through the collator and the log-prob kernel (not a generation), which they key too."""
        return numerics_key(self.args, kernel=self.logprob_kernel if scoring else None,
                            packing=self.collator.pack if scoring else None,
                            max_resp_length=self.args.max_resp_length)

    # ------------------------------------------------------------------------- the Trainer's hooks
    @property
    def checkpoint_dir(self) -> Path:
        """Where the Trainer's checkpoints go: ``OUTPUT/checkpoints/checkpoint-N``."""
        return self.output_dir / "checkpoints"

    def _get_output_dir(self, trial=None) -> str:
        return str(self.checkpoint_dir)

    def get_train_dataloader(self):
        """The Trainer's loader over :class:`TrainingRows`, drawn by the priority sampler (a global order;
        Accelerate gives each process its share of every global batch)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(self.train_dataset, batch_size=self._train_batch_size, sampler=self.sampler,
                            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
                            drop_last=False)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The algorithm's loss (:func:`lolrl.engine.losses.compute_loss`) on the policy's log-probs; the
        per-row statistics go to the next log."""
        args = self.args
        with self.training_precision():  # the one definition of the loss's numerics
            logprobs, mask, _ = response_logprobs(model, inputs, chunk_size=TRAIN_LOGPROB_CHUNK_TOKENS,
                                                  kernel=self.logprob_kernel)
            loss, stats = compute_loss(args.algorithm, logprobs, mask, rewards=inputs.get("rewards"),
                                       advantages=inputs.get("advantages"), ref_logprobs=inputs.get("ref_logprobs"),
                                       clip=args.effective_clip, kl_beta=args.kl_beta, kl_estimator=args.kl_estimator,
                                       gold_floor=args.gold_floor, group_size=args.group_size,
                                       sft_rows=inputs.get("sft_rows"), sft_weight=args.sft_weight)
        for name, value in stats.items():
            self._window.setdefault(name, []).extend(value.float().cpu().tolist())
        self._step_losses.append(float(loss.detach()))
        return (loss, {}) if return_outputs else loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (``--optim``, weight decay off for biases and norms), its ``step`` guarded:
        a step with a non-finite loss or gradient is skipped, N in a row stop the run (:func:`nonfinite_guarded`)."""
        optimizer = super().create_optimizer(model)
        nonfinite_guarded(optimizer, self)
        return optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with the window's per-row statistics (gathered from every process) on a training
        log, which also goes to ``OUTPUT/train_log.jsonl`` (``lr``: the rate after the step)."""
        if "loss" in logs and "eval_loss" not in logs and not any(k.startswith("train_") for k in logs):
            window = self._gathered(self._window)
            self._window = {}
            stats = window_summary(window)
            logs = {**logs, **{k: v for k, v in stats.items() if k != "loss"},
                    **({"row_loss": stats["loss"]} if "loss" in stats else {})}
            entry = {"step": self.state.global_step, "epoch": round(float(self.state.epoch or 0.0), 4),
                     "lr": self.lr_scheduler.get_last_lr()[0],
                     "elapsed_s": round(time.time() - self._started, 2), **stats}
            if self.is_main:
                append_jsonl(self.output_dir / "train_log.jsonl", entry)
        super().log(logs, start_time)

    def _gathered(self, window: dict[str, list[float]]) -> dict[str, list[float]]:
        """Every process's per-row statistics of the window (a collective: every process logs at the same steps)."""
        if self.accelerator.num_processes == 1:
            return window
        from accelerate.utils import gather_object

        merged: dict[str, list[float]] = {}
        for part in gather_object([window]):
            for name, values in part.items():
                merged.setdefault(name, []).extend(values)
        return merged

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Validation: generate on the validation prompts and score them (without a reward: the gold responses'
        NLL per token); log it, and save the model to ``save_dir`` when the task's metric improves."""
        step = self.state.global_step
        summary = self.validation_summary(step)
        measure = summary[self.keeper.metric]
        epoch = float(self.state.epoch or 0.0)
        if self.keeper.record(step, epoch, summary, measure, self._save_best, self.accelerator):
            self.write_card()  # what is known now: the best validation measure and its step (best.json)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def validation_summary(self, step: int) -> dict:
        val = self._val_records()
        was_training = self.model.training
        self.model.eval()
        try:
            if self.reward is None:
                return {"neg_nll_per_token": -self.gold_nll_per_token(self.val_rows)}
            with stage_rng(self.args.seed, f"validation_{step}"):
                reuse, self._reuse = (self._reuse if step == 0 else None), None
                completions, rewards = reuse or self._generate_and_score(val, self.val_rows, "validation")
            return summarize_generations(completions, rewards, golds=self._gold_texts(val))
        finally:
            if was_training:
                self.model.train()

    def gold_nll_per_token(self, rows: list[TokenizedRow]) -> float:
        """Mean NLL per token of the gold responses (the measure when no reward is given)."""
        with self.training_precision():
            outputs = reference_pass(self.model_wrapped, rows, self.collator, self.args.per_device_eval_batch_size,
                                     None, self.accelerator, desc="validation NLL", kernel=self.logprob_kernel)
        tokens = sum(len(lp) for lp in outputs.logprobs)
        return -float(sum(lp.sum() for lp in outputs.logprobs)) / max(tokens, 1)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        inject_fault("mid_checkpoint_save")  # the fault-injection tests: killed with the model written, not the rest
        super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A checkpoint's model files: never with a non-finite weight."""
        check_finite_state({n: p for n, p in self.model.named_parameters() if p.requires_grad},
                           f"the checkpoint {output_dir}")
        super()._save(output_dir, state_dict)

    # --------------------------------------------------------------------------- the best model
    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole state dict, gathered from shards under FSDP / ZeRO-3 (a collective: every process calls it)."""
        return self.accelerator.get_state_dict(self.model_wrapped)

    def _save_best(self) -> None:
        state = self._full_state()
        best = trainable_state(self.accelerator, self.model_wrapped, state)
        # under sharding only the main process holds the gathered weights: its verdict is every process's
        what = f"the best model (for {self.args.save_dir})"
        decided_on_main(self.accelerator, lambda: check_finite_state(best, what))
        self.best_state = best
        self.save_best_model(self.args.save_dir, state)

    def save_best_model(self, directory: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """The model (or only its adapter) and tokenizer, ready for ``from_pretrained``; main process writes."""
        state = self._full_state() if state is None else state

        def write() -> None:
            check_finite_state(state, f"the model for {directory}")
            self.accelerator.unwrap_model(self.model_wrapped).save_pretrained(directory, state_dict=state,
                                                                              safe_serialization=True)
            self.tokenizer.save_pretrained(directory)

        decided_on_main(self.accelerator, write)  # a refusal stops every process, not the main one alone

    def _restore_best(self) -> None:
        if self.best_state is None:
            return
        if not restore_trainable(self.accelerator, self.model_wrapped, self.best_state):
            logger.warning("the final evaluation uses the last weights, not the best validation's: restoring them "
                           "into FSDP1 / DeepSpeed shards is not implemented (the best model is in %s)",
                           self.args.save_dir)

    def _release_training_state(self) -> None:
        """Once training has ended and the best weights are back in the model: the optimizer's moments (twice the
        trainable weights for AdamW) and the best weights' copy are not needed by the final evaluation, whose
        generation would otherwise run with training's memory still held (measured on the benchmark's GPT-2:
        the run's peak was the final evaluation's, 994 MB against 841 MB in the longest training step).
        DeepSpeed's engine owns its optimizer's partitions: left alone."""
        self.best_state = None
        if self.optimizer is not None and not self.is_deepspeed_enabled:
            self.optimizer.state.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------ evaluation
    def evaluate_split(self, split: str, records: list[Record], rows: list[TokenizedRow]) -> dict[str, dict]:
        """Generate on a split, score, and summarise generated and gold responses."""
        self.model.eval()
        completions, rewards = self._generate_and_score(records, rows, f"evaluate {split}")
        golds = self._gold_texts(records)
        knowledge = self._knowledge(records)
        tables = {f"{split}/generated": summarize_generations(completions, rewards, golds, knowledge)}
        gold = reward_matrix(records)
        gold_complete = bool(gold) and all(len(v) == len(records) for v in gold.values())
        if gold_complete or knowledge is not None:
            tables[f"{split}/gold"] = summarize_generations(golds, gold if gold_complete else {}, knowledge=knowledge)
        if self.is_main:
            write_jsonl(self.output_dir / f"{split}_generations.jsonl", [
                {"id": r.id, "response": c, **{k: v[i] for k, v in rewards.items()}}
                for i, (r, c) in enumerate(zip(records, completions))])
            if rewards:
                plot_reward_distributions(rewards, gold or None, self.output_dir / f"reward_distribution_{split}.png",
                                          title=f"{split}: generated vs gold rewards")
        return tables

    def _gold_texts(self, records: list[Record]) -> list[str]:
        """Gold responses without their end-of-text markers, for METEOR and the gold summary."""
        return gold_texts(records, (*self.task.end_markers, self.tokenizer.eos_token))

    def _knowledge(self, records: list[Record]) -> list[str] | None:
        """Each prompt's knowledge for coverage/density (dialogue tasks), else None."""
        if self.task.knowledge is None:
            return None
        return [self.task.knowledge(r.prompt) for r in records]

    # ----------------------------------------------------------------------------- model card
    @functools.cached_property
    def _train_digest(self) -> str:
        return cache_lib.records_digest(self.data.train)

    @functools.cached_property
    def run_key(self) -> str:
        """What a checkpoint must agree with to be resumed (:func:`lolrl.utils.checkpoint.run_key`)."""
        return run_key(self.args.to_dict(), train=self._train_digest,
                       val=cache_lib.records_digest(self._val_records()))

    def write_card(self, results: dict[str, dict] | None = None) -> None:
        """SAVE/README.md (:mod:`lolrl.engine.model_card`): at each new best, and with the final metrics at the end."""
        if not self.is_main:
            return
        rows = {"train": len(self.data.train), "validation": len(self._val_records())}
        if self.args.do_predict and self.data.test:
            rows["test"] = len(self.data.test)
        write_card(self.args.save_dir, offline_card(self.args, rows, self._train_digest, results))

    def push_to_hub(self, *args, **kwargs) -> None:
        """--push_to_hub: the save folder (model or adapter, tokenizer, card) to the hub, from the main process."""
        config = self.args
        decided_on_main(self.accelerator, lambda: push_best(
            config.save_dir, config.hub, Path(config.output_dir).resolve().name, config.algorithm, self.keeper.metric,
            self.keeper.best))

    def init_hf_repo(self, token=None):
        """The Trainer's checkpoint uploads stay off: the best model is uploaded once, at the end
        (:meth:`push_to_hub`)."""

    def _push_from_checkpoint(self, checkpoint_folder):
        pass

    # ------------------------------------------------------------------------------------ run
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs) -> TrainOutput:
        """Train and evaluate (:meth:`run`); returns the Trainer's ``TrainOutput``, its metrics the final
        evaluation's (``val/generated/final_reward``, ...)."""
        results = self.run()
        metrics = {f"{table}/{k}": v for table, values in results.items() for k, v in values.items()
                   if isinstance(v, (int, float))}
        return TrainOutput(self.state.global_step, float(metrics.get("train_loss", 0.0)), metrics)

    def run(self) -> dict[str, dict]:
        """The whole pipeline: the stages, training with validation, the final evaluation. The output and
        save folders are locked for the run (a second run on either is refused). Returns the final
        evaluation's tables ({} when the run stopped early, on ``stop_after_steps``)."""
        folders = {"output folder": self.output_dir, **({"save folder": self.args.save_dir}
                                                          if self.args.do_train else {})}
        with hold_folders(folders, self.is_main):
            try:
                return self._run()
            finally:
                end_trainer_run(self)

    def _run(self) -> dict[str, dict]:
        args = self.args
        if self.is_main:
            atomic_write_json(self.output_dir / "args.json", args.to_dict())
        val_records = self._val_records()
        self.val_rows = self.row_tokenizer(val_records)
        if args.do_train:
            if not self._train():
                return {}
            self._restore_best()
            self._release_training_state()
            if self.is_main:
                plot_loss_curves(self.output_dir / "train_log.jsonl", self.output_dir / "train_loss_trajectory.png",
                                 keys=["loss", "nll", "advantage", "reward", "importance_weight", "raw_ratio",
                                       "gold_objective", "kl_penalty", "lr"])
                plot_validation_curve(self.output_dir / "validation_stats.jsonl",
                                      self.output_dir / "validation_curve.png",
                                      metric=self.keeper.metric)
        results: dict[str, dict] = {}
        splits = [("val", val_records, self.val_rows)]
        if args.do_predict and self.data.test:
            splits.append(("test", self.data.test, self.row_tokenizer(self.data.test)))
        for split, records, rows in splits:
            results.update(self.evaluate_split(split, records, rows))
        if self.is_main:
            paths = write_results_table(self.output_dir, "eval_results", results)
            logger.info("results written to %s", ", ".join(str(p) for p in paths.values()))
        if args.do_train and math.isfinite(self.keeper.best):  # a best model was saved: its card gets the results
            self.write_card(results)
        if args.do_train and args.push_to_hub:
            self.push_to_hub()
        return results

    def _train(self) -> bool:
        """The stages, then the Trainer's loop; False when it stopped early on ``stop_after_steps``."""
        args = self.args
        train_rows = self.row_tokenizer(self.data.train)
        signal = self.prepare_training_signal(train_rows, self.val_rows)
        self.train_dataset = TrainingRows(self._training_table(train_rows, signal), args.group_size)
        self.sampler = PrioritySampler(len(self.train_dataset), args.per_device_train_batch_size,
                                       self.accelerator.num_processes, signal.sample_weights, args.seed,
                                       [sum(r.length for r in train_rows[i:i + args.group_size])
                                        for i in range(0, len(train_rows), args.group_size)]
                                       if args.length_grouping else None)
        self._plan(len(train_rows))
        checkpoint = find_resumable(self.checkpoint_dir, args.resume, self.run_key, self.accelerator,
                                    trainer_layout=True)
        if checkpoint is not None:
            self.seal.resuming_from(checkpoint)
            if self.is_main:
                drop_log_tail(self.output_dir, int(checkpoint.name.split("-")[-1]))
        if args.eval_on_start and checkpoint is None and self.reward is not None:
            # A-LoL already generated with the starting model (pi_ref) on val, with the same decoding: the
            # Trainer's eval_on_start validation reuses them
            self._reuse = self._reference_generations(self.val_rows)
        if checkpoint is None:  # training's own stream, whatever the stages before it did (or a cache skipped)
            seed_stage(args.seed, "train")
        self._started = time.time()
        eval_on_start = args.eval_on_start
        args.eval_on_start = eval_on_start and checkpoint is None  # a resumed run validated its start already
        try:
            super().train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            args.eval_on_start = eval_on_start
        if self.stop.stopped:
            logger.info("stopped after %d optimizer steps as asked; run the same command to resume",
                        self.state.global_step)
            return False
        return True

    def _training_table(self, train_rows: list[TokenizedRow], signal: TrainingSignal):
        """The training dataset, written once by the main process (``OUTPUT/train_table.arrow``), memory-mapped
        by every process."""
        path = self.output_dir / "train_table.arrow"
        with self.accelerator.main_process_first():
            if self.is_main:
                return training_table(train_rows, signal, path)
        from datasets import Dataset

        return Dataset.from_file(str(path))

    def _plan(self, rows: int) -> None:
        """The optimizer steps (``max_steps`` caps the epochs; the HH recipe scales a step budget by the positive
        share), the validation points, and ``OUTPUT/training_plan.json``."""
        args, sampler = self.args, self.sampler
        micro_per_epoch = sampler.steps_per_epoch
        opt_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
        epochs = math.ceil(args.num_train_epochs)
        total = opt_per_epoch * epochs
        if args.max_steps > 0:
            total = min(total, args.max_steps) if epochs else args.max_steps
            if args.step_scale_rows and sampler.weights is not None:
                share = sampler.rows_per_epoch / args.step_scale_rows
                total = max(1, int(total * share))
                if args.eval_steps:
                    args.eval_steps = max(1, int(args.eval_steps * share))
        args.max_steps = max(total, 1)
        self.schedule.plan(opt_per_epoch, args.val_log_frequency, args.max_steps)
        if self.is_main:
            atomic_write_json(self.output_dir / "training_plan.json", {
                "rows": rows, "rows_per_epoch": sampler.rows_per_epoch, "global_batch": sampler.global_batch,
                "micro_steps_per_epoch": micro_per_epoch, "optimizer_steps_per_epoch": opt_per_epoch,
                "optimizer_steps": args.max_steps, "epochs": math.ceil(args.max_steps / opt_per_epoch),
                "validations_per_epoch": len(self.schedule.points)})
        logger.info("training %s: %d optimizer steps (%d per epoch, %d of %d rows per epoch)", args.algorithm,
                    args.max_steps, opt_per_epoch, sampler.rows_per_epoch, rows)
