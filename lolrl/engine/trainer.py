"""The offline policy-gradient trainer: one engine for all eight algorithms, on Accelerate.

Stages (each cached under a key of its inputs, see :mod:`lolrl.utils.cache`):

1. tokenise the records (validated already) and load the policy, which starts as pi_ref;
2. reference pass: pi_ref's log-prob of every training response token, once;
3. value estimate (A-LoL): pi_ref generates on the validation prompts, the reward scores the
   generations, a head V(x) on pi_ref's prompt states is fit to them; training advantages
   A = R - V(x) come from the same reference pass;
4. training: the sampler picks rows, the policy alone runs forward, one loss function by name;
5. validation on a schedule (generate, score, keep the best checkpoint) and the final evaluation.

The same code runs on a CPU, one GPU or several processes under ``accelerate launch``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lolrl.engine.collation import (
    Collator,
    TokenizedRow,
    Tokenizer,
    check_prompts_renderable,
)
from lolrl.engine.config import ConfigError, OfflineRLConfig
from lolrl.engine.data import Record, TaskData, check_reward_scale, reward_matrix
from lolrl.engine.evaluation import (
    plot_loss_curves,
    plot_reward_distributions,
    plot_validation_curve,
    summarize_generations,
    write_results_table,
)
from lolrl.engine.generation import GenerationSettings, generate
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
from lolrl.engine.reference import prompt_states, reference_pass
from lolrl.engine.runtime import backward, end_run, flat_config, make_accelerator, micro_batch
from lolrl.engine.runtime import prepare_for_training, step_scheduler
from lolrl.engine.sampling import EpochSampler, sampling_weights
from lolrl.engine.task import TaskInfo
from lolrl.engine.validation import (
    BestModelKeeper,
    generate_and_score,
    gold_texts,
    score_on_main,
    scored_generations_check,
)
from lolrl.engine.value import (
    INFORMATIVE_R2,
    MIN_VALUE_PROMPTS,
    ValueFitSettings,
    fit_value_head,
    make_value_head,
)
from lolrl.utils import cache as cache_lib
from lolrl.utils.checkpoint import drop_log_tail, find_resumable, resume_training_state, run_key, save_training_state
from lolrl.utils.finite import StepGuard, check_finite_state
from lolrl.utils.io import append_jsonl, atomic_write_json, write_jsonl
from lolrl.utils.lock import ensure_folder, hold_folders
from lolrl.utils.processes import decided_on_main
from lolrl.utils.seeding import seed_stage, stage_rng
from lolrl.utils.sharded import restore_trainable, shards_parameters, trainable_state

logger = logging.getLogger(__name__)


def advantage_statistics(advantages: np.ndarray) -> dict:
    """Mean, spread, deciles and the share of rows the A-LoL objective drops (A <= 0)."""
    return {
        "n": int(advantages.size), "mean": float(advantages.mean()), "median": float(np.median(advantages)),
        "std": float(advantages.std()), "min": float(advantages.min()), "max": float(advantages.max()),
        "percentiles": {str(p): float(np.percentile(advantages, p)) for p in range(0, 101, 10)},
        "share_negative": float(np.mean(advantages < 0)),
        "share_non_positive": float(np.mean(advantages <= 0)),
    }


def _check_reference_cache(rows: int, with_values: bool, payload: dict, tensors: dict) -> None:
    """The reference-pass cache holds ``rows`` log-prob runs (offsets into one flat tensor) and values."""
    offsets, flat = payload["offsets"], tensors["logprobs"]
    if not (isinstance(offsets, list) and len(offsets) == rows + 1 and offsets[0] == 0
            and all(isinstance(o, int) and a <= o for a, o in zip(offsets, offsets[1:]))):
        raise ValueError(f"expected {rows + 1} increasing offsets")
    if flat.ndim != 1 or not flat.is_floating_point() or flat.shape[0] != offsets[-1]:
        raise ValueError(f"log-probs of shape {tuple(flat.shape)} for offsets ending at {offsets[-1]}")
    if with_values and ("values" not in tensors or tuple(tensors["values"].shape) != (rows,)):
        raise ValueError(f"expected {rows} values")
    if not isinstance(payload.get("reports", {}), dict):
        raise TypeError("reports is not an object")


SPREAD_STATS = ("importance_weight", "raw_ratio")  # logged with their min and max over the window's rows too


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


@dataclass
class TrainingSignal:
    """What the loss needs per training row, computed once before training."""

    rewards: np.ndarray | None
    advantages: np.ndarray | None
    ref_logprobs: list[torch.Tensor] | None
    sample_weights: np.ndarray | None
    sft_rows: np.ndarray | None = None  # grouped algorithms: the row of each group that the SFT term trains on


class OfflineRLTrainer:
    """Train with any of ``nll, wbc, r_gold, r_lol, a_lol, a_lol_ref_free, a_lol_seq, a_lol_kl``.

    TRL's form, on 🤗 ``datasets`` in prompt-completion form (:meth:`TaskData.from_datasets`):

    >>> trainer = OfflineRLTrainer(model="path/to/nll_model", args=OfflineRLConfig(output_dir="out",
    ...                            algorithm="a_lol"), train_dataset=train, eval_dataset=val,
    ...                            reward_funcs=[fn1, fn2], reward_weights=[1.0, 0.5])
    >>> results = trainer.train()

    or the scripts' form, on validated records (:func:`lolrl.engine.data.load_task_dir`) and a reward
    (:func:`lolrl.engine.rewards.load_reward`):

    >>> trainer = OfflineRLTrainer(OfflineRLConfig(model_name="path/to/nll_model", output_dir="out",
    ...                                            algorithm="a_lol"), data, reward)
    >>> results = trainer.run()
    """

    def __init__(self, config: OfflineRLConfig | None = None, data: TaskData | None = None, reward=None,
                 accelerator=None, postprocess=None, task: TaskInfo | None = None, *, model: str | None = None,
                 args: OfflineRLConfig | None = None, train_dataset=None, eval_dataset=None, test_dataset=None,
                 reward_funcs=None, reward_weights=None):
        config = self._config_of(config, args, model)
        if train_dataset is not None or eval_dataset is not None or test_dataset is not None:
            if data is not None:
                raise ConfigError("give the data once: data= (records) or train_dataset= / eval_dataset= (datasets)")
            data = TaskData.from_datasets(train_dataset if config.do_train else None, eval_dataset,
                                          test_dataset if config.do_test else None,
                                          require_train_reward=config.algorithm != "nll")
        if data is None:
            raise ConfigError("no data: give train_dataset= and eval_dataset= (datasets), or data= (records)")
        if reward_funcs is not None or reward_weights is not None:
            if reward is not None:
                raise ConfigError("give the reward once: reward= or reward_funcs=")
            from lolrl.engine.rewards import reward_from_funcs

            reward = reward_from_funcs(reward_funcs, reward_weights)
        self.config = config
        self.data = data
        self.reward = reward
        self.postprocess = postprocess  # applied to every generation before scoring (e.g. the HH stop rule)
        self.task = task or TaskInfo(config.task_name)  # what the engine knows of the task
        if config.uses_advantage and reward is None and config.value_source == "generations":
            raise ConfigError(f"{config.algorithm} fits a value estimate on scored generations: it needs a reward "
                              "(or --value_source data, to fit it on the validation records' stored rewards)")
        if config.uses_advantage and config.value_source == "data" and any(
                r.reward is None for r in self._val_records_of(data)):
            raise ConfigError("--value_source data fits V(x) on the validation records' rewards: every validation "
                              "record needs one")
        if config.uses_advantage and config.do_train and len(self._val_records_of(data)) < MIN_VALUE_PROMPTS:
            raise ConfigError(f"{config.algorithm} fits the value estimate on validation prompts: it needs at least "
                              f"{MIN_VALUE_PROMPTS}")
        if config.do_train and data.train and any(r.reward is None for r in data.train) and config.algorithm != "nll":
            raise ConfigError(f"{config.algorithm} needs a reward on every training row")
        self.accelerator = accelerator or self._make_accelerator()
        self.output_dir = ensure_folder(config.output_dir, "output folder")
        self.is_main = self.accelerator.is_main_process
        self.cache = cache_lib.Cache(config.cache_dir, enabled=config.use_cache, accelerator=self.accelerator)
        self.tokenizer = load_tokenizer(config.model_name, config.tokenizer_name)
        for split, records in (("train", data.train), ("val", data.val), ("test", data.test)):
            if records:
                check_prompts_renderable(self.tokenizer, records, split)
        # METEOR's matching stages depend on what NLTK finds installed: say which, once, up front.
        logger.info("meteor_matching: %s", default_matcher().stages)
        self.model = None
        self.global_step = 0
        self.keeper = BestModelKeeper(self.output_dir, config.save_dir,
                                      self.task.val_metric if reward is not None else "neg_nll_per_token")
        self.best_state: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _config_of(config: OfflineRLConfig | None, args: OfflineRLConfig | None, model) -> OfflineRLConfig:
        """The run's settings: ``config`` (positional) or ``args=`` (TRL's name), with ``model=`` as its
        ``model_name``."""
        if (config is None) == (args is None):
            raise ConfigError("give the settings once: OfflineRLTrainer(config, ...) or OfflineRLTrainer(args=...)")
        config = config or args
        if model is not None:
            if not isinstance(model, (str, Path)):
                raise ConfigError(f"model= takes a model folder or hub id, got a {type(model).__name__} "
                                  "(a loaded model object is not supported: save it with save_pretrained)")
            if config.model_name not in (None, str(model)):
                raise ConfigError(f"model={str(model)!r} and args.model_name={config.model_name!r}: give one")
            config = dataclasses.replace(config, model_name=str(model))
        if not config.model_name:
            raise ConfigError("no model: give model= (or OfflineRLConfig(model_name=...))")
        return config

    def train(self) -> dict[str, dict]:
        """Train and evaluate (:meth:`run`): the name TRL's trainers give it."""
        return self.run()

    # ----------------------------------------------------------------------------------- set-up
    def _make_accelerator(self):
        return make_accelerator(self.config, self.config.accumulation_steps)

    def training_precision(self):
        """The numerics of the training loss (the accelerator's autocast under bf16/fp16, nothing in fp32),
        for every pass whose output is compared with the policy's: pi_ref's log-probs, the prompt states V(x)
        is fit on and applied to, pi_ref's validation generations (reused as step 0's validation), every
        validation and the gold NLL. They run before ``accelerator.prepare``, which wraps the model's forward
        in this same autocast, and not all of them call that forward (the output layer runs in chunks; peft's
        ``generate`` calls the base model's, without it): so each enters it explicitly. pi_ref's log-probs
        in fp32 against a bf16 loss scattered the first-step importance weights (0.73 to 1.41 on SmolLM2 in
        issue 22's audit); in the loss's precision they are exactly 1 (tests/test_precision.py)."""
        return self.accelerator.autocast()

    def _load_policy(self) -> None:
        config = self.config
        # bf16/fp16 run under autocast. Full fine-tuning keeps fp32 master weights (as transformers' Trainer
        # does); with LoRA the frozen base is loaded in the low precision and the adapters stay fp32.
        dtype = base_load_dtype(config.dtype, config.lora, config.adapter_path, config.load_in_4bit)
        model = load_model(config.model_name, dtype=dtype,
                           lora=config.lora, adapter_path=config.adapter_path, load_in_4bit=config.load_in_4bit,
                           quantization=config.quantization, device_index=self.accelerator.local_process_index)
        if config.disable_dropout:
            set_dropout(model, 0.0)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.encoder_decoder = model_is_encoder_decoder(model)
        self.row_tokenizer = Tokenizer(self.tokenizer, self.encoder_decoder, config.max_prompt_length,
                                       config.max_resp_length)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(
            getattr(model, "base_model", None), "is_loaded_in_4bit", False)
        self.model = model if quantized else model.to(self.accelerator.device)  # 4-bit weights are placed on load
        self.collator = Collator(self.tokenizer.pad_token_id, self.encoder_decoder,
                                 getattr(model.config, "decoder_start_token_id", None), pack=self._use_packing())
        self.logprob_kernel, why = choose_logprob_kernel(self.model, config.logprob_kernel, self.accelerator.device,
                                                         sharded=shards_parameters(self.accelerator))
        logger.info("log-probs: %s (%s)", self.logprob_kernel, why)

    def _use_packing(self) -> str | bool:
        """Packed rows (no padding) with a variable-length attention kernel; else length-grouped padding.
        The probe runs as training does (under autocast: flash kernels take bf16/fp16 only)."""
        mode = self.config.packing
        if mode == "on" and self.encoder_decoder:
            raise ConfigError("--packing on is for decoder-only models")
        probe = self.row_tokenizer((self.data.train or self.data.val)[:4])
        with self.training_precision():
            pack = choose_packing(self.model, probe, self.tokenizer.pad_token_id, mode,
                                  tolerance=1e-4 if self.config.dtype == "fp32" else 1e-3)
        if mode == "on" and not pack:
            raise ConfigError(f"--packing on: '{self.config.model_name}' does not give the same log-probs packed "
                              "as padded (its attention ignores position-id packing); use --packing auto or off")
        logger.info("batches: %s", f"packed without padding ({pack}; verified exact on this model)" if pack
                    else "padded, grouped by length")
        return pack

    def _model_key(self, scoring: bool = False) -> dict:
        """What pi_ref's numbers depend on (:func:`lolrl.engine.modeling.numerics_key`); ``scoring``: a
        pass through the collator and the log-prob kernel (not a generation), which they key too."""
        return numerics_key(self.config, kernel=self.logprob_kernel if scoring else None,
                            packing=self.collator.pack if scoring else None,
                            max_resp_length=self.config.max_resp_length)

    # ----------------------------------------------------------------------------- the reference
    def _val_records_of(self, data: TaskData) -> list[Record]:
        return data.val[: self.config.max_val_examples] if self.config.max_val_examples else data.val

    def _val_records(self) -> list[Record]:
        return self._val_records_of(self.data)

    def _score(self, records: list[Record], completions: list[str], desc: str) -> dict[str, list[float]]:
        return score_on_main(self.reward, records, completions, self.config.val_batch_size, self.accelerator, desc)

    def _generate_and_score(self, records: list[Record], rows: list[TokenizedRow], desc: str):
        with self.training_precision():
            return generate_and_score(self.model, self.tokenizer, records, rows, self.config.generation,
                                      self.config.val_batch_size, self.accelerator, self.reward, self.postprocess,
                                      desc)

    def _reference_generations(self, val_rows: list[TokenizedRow]) -> tuple[list[str], dict[str, list[float]]]:
        """pi_ref's generations on the validation prompts and their rewards (cached)."""
        val = self._val_records()
        key = cache_lib.hash_json({"stage": "reference_generations", **self._model_key(),
                                   "val": cache_lib.records_digest(val), "reward": self.reward.cache_key(),
                                   "generation": self.config.generation.as_dict()})
        hit = self.cache.load("reference_val_generations", key, scored_generations_check(len(val)))
        if hit is not None:
            return hit[0]["completions"], hit[0]["rewards"]
        with stage_rng(self.config.seed, "reference_generations"):
            completions, rewards = self._generate_and_score(val, val_rows, "reference on val")
        self.cache.save("reference_val_generations", key, {"completions": completions, "rewards": rewards})
        return completions, rewards

    def value_targets(self, val_rows: list[TokenizedRow]) -> list[float]:
        """What V(x) is fit to on each validation prompt: the stored reward (``value_source="data"``),
        the reward of pi_ref's validation-decoding output (``value_samples=1``, the original), or the mean
        reward of ``value_samples`` sampled outputs (cached)."""
        config = self.config
        val = self._val_records()
        if config.value_source == "data":
            return [r.reward for r in val]
        if config.value_samples == 1:
            return self._reference_generations(val_rows)[1]["final_reward"]
        k, n = config.value_samples, len(val)
        sampling = self.value_sampling_settings()
        key = cache_lib.hash_json({"stage": "value_samples", **self._model_key(), "val": cache_lib.records_digest(val),
                                   "reward": self.reward.cache_key(), "generation": sampling.as_dict(), "k": k,
                                   "seed": config.seed})
        hit = self.cache.load("value_samples", key, scored_generations_check(k * n))
        if hit is not None:
            rewards = hit[0]["rewards"]["final_reward"]
        else:
            rows = [dataclasses.replace(row, index=j * n + i) for j in range(k) for i, row in enumerate(val_rows)]
            with stage_rng(config.seed, "value_samples"), self.training_precision():
                completions = generate(self.model, self.tokenizer, rows, sampling, config.val_batch_size,
                                       self.accelerator, desc=f"reference on val: {k} samples")
            if self.postprocess is not None:
                completions = [self.postprocess(c) for c in completions]
            scores = self._score(val * k, completions, "reference samples: reward")
            self.cache.save("value_samples", key, {"completions": completions, "rewards": scores})
            rewards = scores["final_reward"]
        per_prompt = np.array(rewards, dtype=np.float64).reshape(k, n)
        targets = per_prompt.mean(axis=0).tolist()
        logger.info("value targets: mean reward of %d samples per prompt (mean within-prompt std %.4f, "
                    "std of the prompt means %.4f)", k, float(per_prompt.std(axis=0).mean()), float(np.std(targets)))
        return targets

    def value_sampling_settings(self) -> GenerationSettings:
        """The validation decoding's length and stop tokens, sampled from pi_ref itself (temperature 1, no
        top-k, top-p 1, no repetition penalty), unless the validation decoding already samples: then its
        own sampling settings, with one beam."""
        settings = self.config.generation
        if settings.do_sample:
            return dataclasses.replace(settings, num_beams=1)
        return dataclasses.replace(settings, do_sample=True, num_beams=1, temperature=1.0, top_p=1.0, top_k=0,
                                   repetition_penalty=1.0)

    def _fit_value(self, val_rows: list[TokenizedRow], targets: list[float]) -> tuple[torch.nn.Module, dict]:
        config = self.config
        settings = ValueFitSettings(epochs=config.value_epochs, learning_rate=config.value_learning_rate,
                                    folds=config.value_folds, seed=config.seed, head=config.value_head)
        started = time.perf_counter()
        with self.training_precision():  # the states the reference pass applies V(x) to are computed so too
            states = prompt_states(self.model, val_rows, self.tokenizer.pad_token_id, config.val_batch_size,
                                   self.accelerator, desc="value features")
        states_seconds = time.perf_counter() - started
        payload = [None]
        if self.is_main:
            with stage_rng(config.seed, "value_fit"):
                head, report = fit_value_head(states, targets, settings, device=self.accelerator.device)
            payload = [({k: v.cpu() for k, v in head.state_dict().items()},
                        report.as_dict() | {"prompt_states_seconds": states_seconds})]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(payload)
        state, report = payload[0]
        head = make_value_head(config.value_head, states[0].shape[-1])
        head.load_state_dict(state)
        head.eval()
        chosen = (f"ridge penalty {report['ridge_alpha']:.3g}" if report["head"] == "ridge"
                  else f"{report['best_epoch']} epochs")
        logger.info("value head (%s): %d-fold cross-validated MSE %.4f vs %.4f for a constant (R^2 %.3f, rank "
                    "correlation %.3f); fit on all %d validation prompts with %s; prompt states %.1f s, fit %.1f s",
                    report["head"], report["folds"], report["cv_mse"], report["constant_mse"], report["cv_r2"],
                    report["cv_spearman"], report["n_fit"], chosen, report["prompt_states_seconds"],
                    report["fit_seconds"])
        if not report["informative"]:
            logger.warning("V(x) is no better than a constant on new prompts (%d-fold cross-validated R^2 %.3f < %.2f "
                           "over %d validation prompts): the advantage then only keeps rows whose reward is above "
                           "the mean; try --value_samples 4 (or more), more validation prompts, --value_head ridge, "
                           "or more value-head epochs", report["folds"], report["cv_r2"], INFORMATIVE_R2,
                           report["n_fit"])
        return head, report

    def check_reward_agreement(self, sample_size: int = 64) -> dict:
        """Score a sample of training responses with ``--reward`` and compare with the data's rewards.

        V(x) learns the scale of ``--reward`` while A = R - V(x) takes R from the data: if the two
        disagree, the advantages mix two scales. This is cheap and says so loudly."""
        train = self.data.train
        sample = [train[i] for i in np.random.default_rng(self.config.seed).permutation(len(train))[:sample_size]]
        scored = self._score(sample, [r.response for r in sample], "reward check")["final_reward"]
        diff = np.abs(np.array(scored) - np.array([r.reward for r in sample]))
        report = {"rows": len(sample), "mean_abs_diff": float(diff.mean()), "max_abs_diff": float(diff.max()),
                  "data_reward_mean": float(np.mean([r.reward for r in sample])),
                  "scored_reward_mean": float(np.mean(scored))}
        if report["max_abs_diff"] > 1e-3 * max(1.0, abs(report["data_reward_mean"])):
            logger.warning("--reward disagrees with the training data's rewards on %d sampled rows (mean |diff| %.4f, "
                           "data mean %.4f vs scored mean %.4f): the value estimate and the advantages use "
                           "different reward scales", len(sample), report["mean_abs_diff"],
                           report["data_reward_mean"], report["scored_reward_mean"])
        return report

    def _write_reports(self, reports: dict) -> None:
        if self.is_main:
            for name, report in reports.items():
                atomic_write_json(self.output_dir / f"{name}.json", report)

    def prepare_training_signal(self, train_rows: list[TokenizedRow], val_rows: list[TokenizedRow]) -> TrainingSignal:
        """Reference log-probs, value estimate, advantages and sampling weights, computed once."""
        config = self.config
        train = self.data.train
        rewards = np.array([r.reward for r in train], dtype=np.float64) if config.algorithm != "nll" else None
        if rewards is not None:
            check_reward_scale(rewards, [r.id for r in train], "training rewards")
        if config.group_size > 1:
            return TrainingSignal(rewards, None, None, None, self._sft_rows(train))
        if not (config.uses_reference or config.uses_advantage):
            weights = sampling_weights(config.sampling_strategy, rewards, len(train))
            return TrainingSignal(rewards, None, None, weights)

        key = cache_lib.hash_json({"stage": "reference_pass", **self._model_key(scoring=True),
                                   "train": self._train_digest, "value": config.uses_advantage and {
                                       "val": cache_lib.records_digest(self._val_records()),
                                       "source": config.value_source, "reward": self.reward and self.reward.cache_key(),
                                       "generation": config.generation.as_dict(), "samples": config.value_samples,
                                       "epochs": config.value_epochs, "lr": config.value_learning_rate,
                                       "folds": config.value_folds, "seed": config.seed,
                                       **({"head": config.value_head} if config.value_head != "attention" else {})}})
        hit = self.cache.load("reference_pass", key, functools.partial(_check_reference_cache, len(train),
                                                                      config.uses_advantage))
        if hit is not None:
            payload, tensors = hit
            reports = payload.get("reports", {})
            self._write_reports(reports)
            offsets = payload["offsets"]
            flat = tensors["logprobs"]
            ref_logprobs = [flat[offsets[i]:offsets[i + 1]] for i in range(len(train))]
            values = tensors["values"].double().numpy() if "values" in tensors else None
        else:
            head, reports = None, {}
            if config.uses_advantage:
                if config.value_source == "generations":
                    reports["reward_check"] = self.check_reward_agreement()
                head, reports["value_fit"] = self._fit_value(val_rows, self.value_targets(val_rows))
                self._write_reports(reports)
            started = time.perf_counter()
            with self.training_precision():
                outputs = reference_pass(self.model, train_rows, self.collator, config.val_batch_size, head,
                                         self.accelerator, desc="reference pass (train)", kernel=self.logprob_kernel)
            logger.info("reference pass over %d training rows: %.1f s", len(train_rows), time.perf_counter() - started)
            ref_logprobs, values = outputs.logprobs, outputs.values
            offsets = np.cumsum([0] + [len(lp) for lp in ref_logprobs]).tolist()
            tensors = {"logprobs": torch.cat(ref_logprobs)}
            if values is not None:
                tensors["values"] = torch.tensor(values)
            self.cache.save("reference_pass", key, {"offsets": offsets, "reports": reports}, tensors)

        advantages = None
        if config.uses_advantage:
            advantages = rewards - values
            check_reward_scale(advantages, [r.id for r in train], "training advantages (R - V(x))")
            stats = advantage_statistics(advantages)
            fit = reports.get("value_fit", {})
            stats["value_fit"] = {k: fit.get(k) for k in ("cv_r2", "cv_spearman", "informative")}
            if self.is_main:
                atomic_write_json(self.output_dir / "advantage_stats.json", stats)
            logger.info("training advantages: mean %.4f, median %.4f; %.1f%% negative (dropped by A-LoL)",
                        stats["mean"], stats["median"], 100 * stats["share_negative"])
        priority_values = advantages if config.uses_advantage else rewards
        weights = sampling_weights(config.sampling_strategy, priority_values, len(train))
        return TrainingSignal(rewards, advantages, ref_logprobs if config.uses_reference else None, weights)

    def _sft_rows(self, train: list[Record]) -> np.ndarray:
        """Check the grouped layout (consecutive candidates of one prompt, one flagged ``meta["sft"]``)."""
        size = self.config.group_size
        if len(train) % size:
            raise ConfigError(f"{len(train)} training rows do not split into groups of {size} candidates")
        flags = np.array([bool(r.meta.get("sft")) for r in train])
        for start in range(0, len(train), size):
            group = train[start:start + size]
            if len({json.dumps(r.prompt) for r in group}) != 1 or flags[start:start + size].sum() != 1:
                raise ConfigError(f"training rows {start}..{start + size - 1} ({group[0].id}...) are not one prompt's "
                                  f"{size} candidates with exactly one meta['sft'] row")
        return flags

    # ------------------------------------------------------------------------------ validation
    def validate(self, val_rows: list[TokenizedRow], step: int, epoch: float, generations=None) -> bool:
        """Generate on the validation prompts and score (the task's metric selects the best model; without
        a reward, the gold responses' NLL per token); keep the model when it improves. ``generations`` =
        (completions, rewards) already made by this very model, to reuse. Returns whether it improved."""
        val = self._val_records()
        if self.reward is None:
            summary = {"neg_nll_per_token": -self.gold_nll_per_token(val_rows)}
        else:
            with stage_rng(self.config.seed, f"validation_{step}"):
                completions, rewards = generations or self._generate_and_score(val, val_rows, "validation")
            summary = summarize_generations(completions, rewards, golds=self._gold_texts(val))
        measure = summary[self.keeper.metric]
        improved = self.keeper.record(step, epoch, summary, measure, self._save_best, self.accelerator)
        if improved:
            self.write_card()  # what is known now: the best validation measure and its step (best.json)
        return improved

    def gold_nll_per_token(self, rows: list[TokenizedRow]) -> float:
        """Mean NLL per token of the gold responses (the measure when no reward is given)."""
        with self.training_precision():
            outputs = reference_pass(self.model, rows, self.collator, self.config.val_batch_size, None,
                                     self.accelerator, desc="validation NLL", kernel=self.logprob_kernel)
        tokens = sum(len(lp) for lp in outputs.logprobs)
        return -float(sum(lp.sum() for lp in outputs.logprobs)) / max(tokens, 1)

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole state dict, gathered from shards under FSDP / ZeRO-3 (a collective: every process calls it)."""
        return self.accelerator.get_state_dict(self.model)

    def _trainable_state(self, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        return trainable_state(self.accelerator, self.model, full_state)

    def _save_best(self) -> None:
        state = self._full_state()
        best = self._trainable_state(state)
        # under sharding only the main process holds the gathered weights: its verdict is every process's
        what = f"the best model (for {self.config.save_dir})"
        decided_on_main(self.accelerator, lambda: check_finite_state(best, what))
        self.best_state = best
        self.save_model(self.config.save_dir, state)

    def save_model(self, directory: str, state: dict[str, torch.Tensor] | None = None) -> None:
        """The model (or only its adapter) and tokenizer, ready for ``from_pretrained``; main process writes."""
        state = self._full_state() if state is None else state

        def write() -> None:
            check_finite_state(state, f"the model for {directory}")
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(directory, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(directory)

        decided_on_main(self.accelerator, write)  # a refusal stops every process, not the main one alone

    # -------------------------------------------------------------------------------- training
    def _optimizer(self, total_steps: int):
        """The prepared model and optimizer, and the schedule over ``total_steps`` optimizer steps (not
        prepared: see :func:`prepare_for_training`; stepped once per optimizer step)."""
        from transformers import get_scheduler

        from lolrl.engine.optim import build_optimizer

        c = self.config
        optimizer = build_optimizer(self.model, c.optim, c.learning_rate, (c.adam_beta1, c.adam_beta2), c.adam_epsilon,
                                    c.weight_decay)
        self.model, optimizer = prepare_for_training(self.accelerator, self.model, optimizer, c.max_grad_norm)
        scheduler = get_scheduler(c.lr_scheduler, optimizer, num_warmup_steps=int(c.warmup_ratio * total_steps),
                                  num_training_steps=total_steps)
        return optimizer, scheduler

    def _batch_tensors(self, indices: list[int], rows: list[TokenizedRow], signal: TrainingSignal) -> dict:
        size = self.config.group_size  # indices count training items: groups of `size` consecutive rows
        indices = [i * size + k for i in indices for k in range(size)]
        batch = {k: v.to(self.accelerator.device) for k, v in self.collator([rows[i] for i in indices]).items()}
        device = self.accelerator.device
        if signal.rewards is not None:
            batch["rewards"] = torch.tensor(signal.rewards[indices], dtype=torch.float32, device=device)
        if signal.advantages is not None:
            batch["advantages"] = torch.tensor(signal.advantages[indices], dtype=torch.float32, device=device)
        if signal.ref_logprobs is not None:  # same [rows, longest response] layout as the policy's log-probs
            batch["ref_logprobs"] = torch.nn.utils.rnn.pad_sequence(
                [signal.ref_logprobs[i] for i in indices], batch_first=True).to(device)
        if signal.sft_rows is not None:
            batch["sft_rows"] = torch.tensor(signal.sft_rows[indices], device=device)
        return batch

    def _loss(self, batch: dict):
        config = self.config
        with self.training_precision():  # the one definition of the loss's numerics
            logprobs, mask, _ = response_logprobs(self.model, batch, kernel=self.logprob_kernel)
            return compute_loss(config.algorithm, logprobs, mask, rewards=batch.get("rewards"),
                                advantages=batch.get("advantages"), ref_logprobs=batch.get("ref_logprobs"),
                                clip=config.effective_clip, kl_beta=config.kl_beta, kl_estimator=config.kl_estimator,
                                gold_floor=config.gold_floor, group_size=config.group_size,
                                sft_rows=batch.get("sft_rows"), sft_weight=config.sft_weight)

    # ----------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @functools.cached_property
    def _train_digest(self) -> str:
        return cache_lib.records_digest(self.data.train)

    @functools.cached_property
    def _run_key(self) -> str:
        return run_key(self.config.to_dict(), train=self._train_digest, val=cache_lib.records_digest(self._val_records()))

    # ----------------------------------------------------------------------------- model card
    def write_card(self, results: dict[str, dict] | None = None) -> None:
        """SAVE/README.md (:mod:`lolrl.engine.model_card`): at each new best, and with the final metrics at the end."""
        if not self.is_main:
            return
        rows = {"train": len(self.data.train), "validation": len(self._val_records())}
        if self.config.do_test and self.data.test:
            rows["test"] = len(self.data.test)
        write_card(self.config.save_dir, offline_card(self.config, rows, self._train_digest, results))

    def push_to_hub(self) -> None:
        """--push_to_hub: the save folder (model or adapter, tokenizer, card) to the hub, from the main process."""
        config = self.config
        decided_on_main(self.accelerator, lambda: push_best(
            config.save_dir, config.hub, Path(config.output_dir).resolve().name, config.algorithm, self.keeper.metric,
            self.keeper.best))

    def find_checkpoint(self) -> Path | None:
        return find_resumable(self.checkpoint_dir, self.config.resume, self._run_key, self.accelerator)

    def _save_checkpoint(self, optimizer, scheduler, epoch: int, next_group: int) -> None:
        trainable = self._trainable_state()  # a collective under FSDP / ZeRO-3: every process gathers
        best = self.keeper.best if math.isfinite(self.keeper.best) else None
        progress = {"epoch": epoch, "next_group": next_group, "best_measure": best, "run_key": self._run_key}
        save_training_state(self.accelerator, self.checkpoint_dir, self.global_step, trainable, self.model, optimizer,
                            scheduler, progress, self.best_state, self.config.keep_checkpoints)

    def _resume(self, checkpoint: Path, optimizer, scheduler) -> tuple[int, int]:
        state, best = resume_training_state(self.accelerator, checkpoint, self.model, optimizer, scheduler)
        self.global_step = state["step"]
        measure = state["progress"]["best_measure"]
        self.keeper.best = -math.inf if measure is None else measure
        self.best_state = best
        if self.is_main:
            drop_log_tail(self.output_dir, self.global_step)
        return state["progress"]["epoch"], state["progress"]["next_group"]

    def _should_checkpoint(self, validated: bool) -> bool:
        every = self.config.save_steps
        return (every == 0 and validated) or (every > 0 and self.global_step % every == 0)

    # -------------------------------------------------------------------------------- training
    def _train_loop(self, train_rows: list[TokenizedRow], val_rows: list[TokenizedRow], signal: TrainingSignal,
                    checkpoint: Path | None = None) -> bool:
        """The optimisation loop; returns False when it stopped early on ``stop_after_steps``."""
        config, acc = self.config, self.accelerator
        size = config.group_size  # the sampler draws training items: single rows, or groups of candidates
        item_lengths = [sum(r.length for r in train_rows[i:i + size]) for i in range(0, len(train_rows), size)]
        sampler = EpochSampler(len(item_lengths), config.batch_size, acc.num_processes, acc.process_index,
                               signal.sample_weights, config.seed, item_lengths if config.length_grouping else None)
        micro_per_epoch = sampler.steps_per_epoch
        opt_per_epoch = math.ceil(micro_per_epoch / config.accumulation_steps)
        total = opt_per_epoch * config.n_epochs
        eval_steps = config.eval_steps
        if config.max_steps > 0:
            total = min(total, config.max_steps) if config.n_epochs else config.max_steps
            if config.step_scale_rows and signal.sample_weights is not None:
                # the HH recipe: a step budget for all prompts shrinks (or grows) with the positive share
                share = sampler.rows_per_epoch / config.step_scale_rows
                total, eval_steps = max(1, int(total * share)), max(1, int(eval_steps * share)) if eval_steps > 0 else 0
        epochs = math.ceil(total / opt_per_epoch) if opt_per_epoch else 0
        # vf validations per epoch, evenly spaced, the last at the epoch's end (fewer if the epoch is shorter)
        val_points = {max(1, round(k * opt_per_epoch / config.val_log_frequency))
                      for k in range(1, config.val_log_frequency + 1)}
        optimizer, scheduler = self._optimizer(max(total, 1))
        if self.is_main:
            atomic_write_json(self.output_dir / "training_plan.json", {
                "rows": len(train_rows), "rows_per_epoch": sampler.rows_per_epoch, "global_batch": sampler.global_batch,
                "micro_steps_per_epoch": micro_per_epoch, "optimizer_steps_per_epoch": opt_per_epoch,
                "optimizer_steps": total, "epochs": epochs, "validations_per_epoch": len(val_points)})
        logger.info("training %s: %d optimizer steps (%d per epoch, %d of %d rows per epoch)", config.algorithm,
                    total, opt_per_epoch, sampler.rows_per_epoch, len(train_rows))
        progress = tqdm(total=total, desc=f"train {config.algorithm}", disable=not acc.is_local_main_process)
        if checkpoint is None:  # training's own stream, whatever the stages before it did (or a cache skipped)
            seed_stage(config.seed, "train")
        start_epoch, start_group = self._resume(checkpoint, optimizer, scheduler) if checkpoint else (0, 0)
        progress.update(self.global_step)
        window: dict[str, list[float]] = {}
        guard, losses = StepGuard(config.max_nonfinite_steps, acc, "training"), []
        started = time.time()
        self.model.train()
        for epoch in range(start_epoch, epochs):
            batches = sampler.batches(epoch)
            first = start_group * config.accumulation_steps if epoch == start_epoch else 0
            for group_start in range(first, len(batches), config.accumulation_steps):
                if self.global_step >= total:
                    break
                group = batches[group_start:group_start + config.accumulation_steps]
                for j, indices in enumerate(group):
                    with micro_batch(acc, self.model, last=j == len(group) - 1):
                        loss, stats = self._loss(self._batch_tensors(indices, train_rows, signal))
                        backward(acc, loss, len(group))
                    losses.append(float(loss.detach()))
                    for name, value in stats.items():
                        window.setdefault(name, []).extend(value.float().cpu().tolist())
                if guard.allow_step(losses, self.model, self.global_step + 1):
                    if config.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    step_scheduler(acc, scheduler)
                optimizer.zero_grad()
                losses = []
                self.global_step += 1
                progress.update(1)
                step_in_epoch = group_start // config.accumulation_steps + 1
                scheduled = (self.global_step % eval_steps == 0) if eval_steps > 0 else step_in_epoch in val_points
                validate = scheduled or self.global_step == total
                if self.global_step % config.logging_steps == 0 or validate:
                    self._log(window, epoch + step_in_epoch / opt_per_epoch, scheduler, started, progress)
                    window = {}
                if validate:
                    self.validate(val_rows, self.global_step, epoch + step_in_epoch / opt_per_epoch)
                    self.model.train()
                stopping = self.global_step == config.stop_after_steps
                if self._should_checkpoint(validate) or stopping:
                    self._save_checkpoint(optimizer, scheduler, epoch, step_in_epoch)
                if stopping:
                    progress.close()
                    logger.info("stopped after %d optimizer steps as asked; run the same command to resume",
                                self.global_step)
                    return False
        progress.close()
        return True

    def _log(self, window: dict[str, list[float]], epoch: float, scheduler, started: float, progress) -> None:
        entry = {"step": self.global_step, "epoch": round(epoch, 4), "lr": scheduler.get_last_lr()[0],
                 "elapsed_s": round(time.time() - started, 2)}
        entry.update(window_summary(self._gathered(window)))
        progress.set_postfix({k: f"{entry[k]:.3g}" for k in ("loss", "nll", "advantage", "importance_weight") if k in entry})
        if self.is_main:
            append_jsonl(self.output_dir / "train_log.jsonl", entry)
        self.accelerator.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=self.global_step)

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

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, records: list[Record], rows: list[TokenizedRow]) -> dict[str, dict]:
        """Generate on a split, score, and summarise generated and gold responses."""
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

    def _restore_best(self) -> None:
        if self.best_state is None:
            return
        if not restore_trainable(self.accelerator, self.model, self.best_state):
            logger.warning("the final evaluation uses the last weights, not the best validation's: restoring them "
                           "into FSDP1 / DeepSpeed shards is not implemented (the best model is in %s)",
                           self.config.save_dir)

    # ------------------------------------------------------------------------------------ run
    def _end_run(self) -> None:
        """The wrapped (DDP) model goes before the process group does (see :func:`end_run`)."""
        self.model = self.accelerator.unwrap_model(self.model)
        end_run(self.accelerator)

    def run(self) -> dict[str, dict]:
        """The whole pipeline: reference signal, training with validation, final evaluation. The output
        and save folders are locked for the run (a second run on either is refused)."""
        folders = {"output folder": self.output_dir, **({"save folder": self.config.save_dir}
                                                          if self.config.do_train else {})}
        with hold_folders(folders, self.is_main):
            return self._run()

    def _run(self) -> dict[str, dict]:
        config = self.config
        if self.is_main:
            atomic_write_json(self.output_dir / "args.json", config.to_dict())
        self._load_policy()
        val_records = self._val_records()
        val_rows = self.row_tokenizer(val_records)
        if config.do_train:
            train_rows = self.row_tokenizer(self.data.train)
            signal = self.prepare_training_signal(train_rows, val_rows)
            checkpoint = self.find_checkpoint()
            if config.report_to not in (None, "none"):  # before the first validation, which logs val/ too
                self.accelerator.init_trackers("lolrl", config=flat_config(config.to_dict()))
            if config.eval_in_beginning and checkpoint is None:
                # A-LoL already generated with the starting model (pi_ref) on val, with the same decoding.
                reuse = self._reference_generations(val_rows) if self.reward is not None else None
                self.validate(val_rows, 0, 0.0, reuse)
            if not self._train_loop(train_rows, val_rows, signal, checkpoint):
                self._end_run()
                return {}
            self._restore_best()
            if self.is_main:
                plot_loss_curves(self.output_dir / "train_log.jsonl", self.output_dir / "train_loss_trajectory.png",
                                 keys=["loss", "nll", "advantage", "reward", "importance_weight", "raw_ratio",
                                       "gold_objective", "kl_penalty", "lr"])
                plot_validation_curve(self.output_dir / "validation_stats.jsonl", self.output_dir / "validation_curve.png",
                                      metric=self.keeper.metric)
        results: dict[str, dict] = {}
        splits = [("val", val_records, val_rows)]
        if config.do_test and self.data.test:
            splits.append(("test", self.data.test, self.row_tokenizer(self.data.test)))
        for split, records, rows in splits:
            results.update(self.evaluate(split, records, rows))
        if self.is_main:
            paths = write_results_table(self.output_dir, "eval_results", results)
            logger.info("results written to %s", ", ".join(str(p) for p in paths.values()))
        if config.do_train and math.isfinite(self.keeper.best):  # a best model was saved: its card gets the results
            self.write_card(results)
        try:
            if config.do_train and config.hub.push_to_hub:
                self.push_to_hub()
        finally:
            self._end_run()
        return results
