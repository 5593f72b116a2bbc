"""The stages before training, run once per run and cached under keys of all their inputs
(:mod:`lolrl.utils.cache`): pi_ref's generations on the validation prompts and their rewards, the value head
V(x) on pi_ref's prompt states, the reference pass over the training rows (pi_ref's log-prob of every response
token, and V(x) of every training prompt), the advantages A = R - V(x) (with ``value_source="group"``: A_i =
R_i - the mean reward of the other responses to row i's prompt, V(x) only for a prompt with a single response)
and the sampling weights. Each runs in the precision of training (:meth:`training_precision`) and under its
own seeded random stream (:func:`lolrl.utils.seeding.stage_rng`), so a cold and a warm cache give the same
run.

:class:`ReferenceStages` is a part of :class:`lolrl.engine.trainer.OfflineRLTrainer`: it reads the
trainer's ``args``, ``model`` (pi_ref, before training), ``accelerator``, ``tokenizer``, ``reward``
and ``cache``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from lolrl.engine.collation import TokenizedRow
from lolrl.engine.config import ConfigError
from lolrl.engine.data import Record, TaskData, check_reward_scale
from lolrl.engine.generation import GenerationSettings, generate, prefill_prompt_states
from lolrl.engine.reference import prompt_states, reference_pass
from lolrl.engine.sampling import sampling_weights
from lolrl.engine.validation import generate_and_score, score_on_main, scored_generations_check
from lolrl.engine.value import FIT_VERSION, INFORMATIVE_R2, ValueFitSettings, fit_value_head, make_value_head
from lolrl.utils import cache as cache_lib
from lolrl.utils.io import atomic_write_json
from lolrl.utils.seeding import stage_rng

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


def prompt_key(record: Record) -> str:
    """The text a group of responses shares: the prompt (a string, or a chat as its messages)."""
    return record.prompt if isinstance(record.prompt, str) else json.dumps(record.prompt, sort_keys=True)


def prompt_groups(records: list[Record]) -> list[np.ndarray]:
    """The rows of each distinct prompt text, in first-seen order (a prompt's rows need not be consecutive)."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(prompt_key(record), []).append(i)
    return [np.array(rows) for rows in groups.values()]


def leave_one_out_baselines(rewards: np.ndarray, groups: list[np.ndarray]) -> np.ndarray:
    """``b_i = mean_{j != i} R_j`` over the other rows of row i's group (RLOO's baseline); NaN for a row
    alone in its group (a prompt with a single response has no other response to compare with)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    baselines = np.full(rewards.shape, np.nan)
    for rows in groups:
        if len(rows) > 1:
            baselines[rows] = (rewards[rows].sum() - rewards[rows]) / (len(rows) - 1)
    return baselines


def check_group_singletons(records: list[Record], policy: str) -> list[int]:
    """The rows alone in their prompt's group (``value_source="group"``); with ``policy="refuse"`` a single one
    is refused, naming the row and its prompt."""
    singletons = sorted(int(rows[0]) for rows in prompt_groups(records) if len(rows) == 1)
    if singletons and policy == "refuse":
        first = records[singletons[0]]
        prompt = prompt_key(first)
        raise ConfigError(f"--value_source group: training row {singletons[0]} (id '{first.id}', prompt "
                          f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''}) is the only response to its prompt "
                          f"({len(singletons)} such rows); --group_singletons generations or data gives them "
                          "A = R - V(x)")
    return singletons


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



@dataclass
class TrainingSignal:
    """What the loss needs per training row, computed once before training."""

    rewards: np.ndarray | None
    advantages: np.ndarray | None
    ref_logprobs: list[torch.Tensor] | None
    sample_weights: np.ndarray | None
    sft_rows: np.ndarray | None = None  # grouped algorithms: the row of each group that the SFT term trains on



class ReferenceStages:
    """pi_ref's stages (a part of the trainer, see the module's docstring)."""

    stage_seconds: dict[str, float]  # the stages this run computed (not loaded from the cache): seconds each

    def _val_records_of(self, data: TaskData) -> list[Record]:
        return data.val[: self.args.max_val_examples] if self.args.max_val_examples else data.val

    def _val_records(self) -> list[Record]:
        return self._val_records_of(self.data)

    def _score(self, records: list[Record], completions: list[str], desc: str) -> dict[str, list[float]]:
        return score_on_main(self.reward, records, completions, self.args.per_device_eval_batch_size,
                             self.accelerator, desc)

    def _generate_and_score(self, records: list[Record], rows: list[TokenizedRow], desc: str,
                            prompt_states: list | None = None):
        with self.training_precision():
            return generate_and_score(self.model, self.tokenizer, records, rows, self.args.generation,
                                      self.args.per_device_eval_batch_size, self.accelerator, self.reward,
                                      self.postprocess, desc, prompt_states)

    # pi_ref's validation generation's prompt states, kept for the value head (:meth:`_value_features`)
    _prefill_states: list[torch.Tensor] | None = None

    def _reference_generations(self, val_rows: list[TokenizedRow], keep_states: bool = False
                               ) -> tuple[list[str], dict[str, list[float]]]:
        """pi_ref's generations on the validation prompts and their rewards (cached). ``keep_states``: a generation
        run here also keeps its prefill's prompt states for the value head."""
        val = self._val_records()
        key = cache_lib.hash_json({"stage": "reference_generations", **self._model_key(),
                                   "val": cache_lib.records_digest(val), "reward": self.reward.cache_key(),
                                   "generation": self.args.generation.as_dict()})
        hit = self.cache.load("reference_val_generations", key, scored_generations_check(len(val)))
        if hit is not None:
            return hit[0]["completions"], hit[0]["rewards"]
        started = time.perf_counter()
        states = [] if keep_states else None
        with stage_rng(self.args.seed, "reference_generations"):
            completions, rewards = self._generate_and_score(val, val_rows, "reference on val", states)
        self.stage_seconds["reference_generations"] = time.perf_counter() - started
        self._prefill_states = states
        self.cache.save("reference_val_generations", key, {"completions": completions, "rewards": rewards})
        return completions, rewards

    def value_targets(self, val_rows: list[TokenizedRow]) -> list[float]:
        """What V(x) is fit to on each validation prompt: the stored reward (``value_source="data"``),
        the reward of pi_ref's validation-decoding output (``value_samples=1``, the original), or the mean
        reward of ``value_samples`` sampled outputs (cached)."""
        config = self.args
        val = self._val_records()
        if config.value_fit_source == "data":
            return [r.reward for r in val]
        if config.value_samples == 1:
            return self._reference_generations(val_rows, keep_states=True)[1]["final_reward"]
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
                completions = generate(self.model, self.tokenizer, rows, sampling, config.per_device_eval_batch_size,
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
        settings = self.args.generation
        if settings.do_sample:
            return dataclasses.replace(settings, num_beams=1)
        return dataclasses.replace(settings, do_sample=True, num_beams=1, temperature=1.0, top_p=1.0, top_k=0,
                                   repetition_penalty=1.0)

    def _fit_value(self, val_rows: list[TokenizedRow], targets: list[float]) -> tuple[torch.nn.Module, dict]:
        config = self.args
        settings = self.value_fit_settings()
        started = time.perf_counter()
        states, source = self._value_features(val_rows)
        states_seconds = time.perf_counter() - started
        payload = [None]
        if self.is_main:
            with stage_rng(config.seed, "value_fit"):
                head, report = fit_value_head(states, targets, settings, device=self.accelerator.device)
            payload = [({k: v.cpu() for k, v in head.state_dict().items()},
                        report.as_dict() | {"prompt_states_seconds": states_seconds, "prompt_states": source})]
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
                    "correlation %.3f); fit on all %d validation prompts with %s; prompt states (%s) %.1f s, "
                    "fit %.1f s",
                    report["head"], report["folds"], report["cv_mse"], report["constant_mse"], report["cv_r2"],
                    report["cv_spearman"], report["n_fit"], chosen, report["prompt_states"],
                    report["prompt_states_seconds"], report["fit_seconds"])
        if not report["informative"]:
            logger.warning("V(x) is no better than a constant on new prompts (%d-fold cross-validated R^2 %.3f < %.2f "
                           "over %d validation prompts): the advantage then only keeps rows whose reward is above "
                           "the mean; try --value_samples 4 (or more), more validation prompts, --value_head ridge, "
                           "or more value-head epochs", report["folds"], report["cv_r2"], INFORMATIVE_R2,
                           report["n_fit"])
        return head, report

    def value_fit_settings(self) -> ValueFitSettings:
        """The value head's fit as this run's settings ask for it."""
        config = self.args
        return ValueFitSettings(epochs=config.value_epochs, learning_rate=config.value_learning_rate,
                                folds=config.value_folds, seed=config.seed, head=config.value_head)

    def _value_features(self, val_rows: list[TokenizedRow]) -> tuple[list[torch.Tensor], str]:
        """The validation prompts' states V(x) is fit on, and where they came from. When V(x)'s targets are the
        rewards of pi_ref's validation generation (``value_samples`` 1), its prefill computed them: kept from it
        (``generation``), or, when the generations came from the cache, recomputed by the same calls stopped after
        the prefill (``prefill``), bit for bit the same (cold or warm cache, one result). Otherwise a forward of
        their own (``forward``). Either way in the training precision, as the reference pass's states that V(x)
        is applied to, which agree with them to rounding."""
        config = self.args
        if config.value_fit_source == "generations" and config.value_samples == 1:
            states, self._prefill_states = self._prefill_states, None
            if states is not None:
                return states, "generation"
            with stage_rng(config.seed, "reference_generations"), self.training_precision():
                return prefill_prompt_states(self.model, self.tokenizer, val_rows, config.generation,
                                             config.per_device_eval_batch_size, self.accelerator,
                                             desc="value features (prefill)"), "prefill"
        return self.forward_prompt_states(val_rows), "forward"

    def forward_prompt_states(self, val_rows: list[TokenizedRow]) -> list[torch.Tensor]:
        """The validation prompts' states by a forward of their own (:func:`lolrl.engine.reference.prompt_states`),
        in the training precision."""
        with self.training_precision():
            return prompt_states(self.model, val_rows, self.tokenizer.pad_token_id,
                                 self.args.per_device_eval_batch_size, self.accelerator, desc="value features")

    def check_reward_agreement(self, sample_size: int = 64) -> dict:
        """Score a sample of training responses with ``--reward`` and compare with the data's rewards.

        V(x) learns the scale of ``--reward`` while A = R - V(x) takes R from the data: if the two
        disagree, the advantages mix two scales. This is cheap and says so loudly."""
        train = self.data.train
        sample = [train[i] for i in np.random.default_rng(self.args.seed).permutation(len(train))[:sample_size]]
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
        config = self.args
        train = self.data.train
        rewards = np.array([r.reward for r in train], dtype=np.float64) if config.algorithm != "nll" else None
        if rewards is not None:
            check_reward_scale(rewards, [r.id for r in train], "training rewards")
        if config.group_size > 1:
            return TrainingSignal(rewards, None, None, None, self._sft_rows(train))
        if not (config.uses_reference or config.uses_advantage):
            weights = sampling_weights(config.sampling_strategy, rewards, len(train))
            return TrainingSignal(rewards, None, None, weights)

        # value_source group: V(x) is fit only when some prompt has a single response (its rows' fallback)
        baselines = (leave_one_out_baselines(rewards, prompt_groups(train))
                     if config.uses_advantage and config.value_source == "group" else None)
        if baselines is not None:
            check_group_singletons(train, config.group_singletons)
        fits_value = config.uses_advantage and (baselines is None or bool(np.isnan(baselines).any()))
        key = cache_lib.hash_json({"stage": "reference_pass", **self._model_key(scoring=True),
                                   "train": self._train_digest, "value": config.uses_advantage and {
                                       "val": cache_lib.records_digest(self._val_records()),
                                       "source": config.value_source, "reward": self.reward and self.reward.cache_key(),
                                       "generation": config.generation.as_dict(), "samples": config.value_samples,
                                       "epochs": config.value_epochs, "lr": config.value_learning_rate,
                                       "folds": config.value_folds, "seed": config.seed, "fit": FIT_VERSION,
                                       **({"head": config.value_head} if config.value_head != "attention" else {}),
                                       **({"singletons": config.group_singletons, "fits_value": fits_value}
                                          if baselines is not None else {})}})
        hit = self.cache.load("reference_pass", key, functools.partial(_check_reference_cache, len(train),
                                                                      fits_value))
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
            if fits_value:
                if config.value_fit_source == "generations":
                    reports["reward_check"] = self.check_reward_agreement()
                head, reports["value_fit"] = self._fit_value(val_rows, self.value_targets(val_rows))
                self._write_reports(reports)
            started = time.perf_counter()
            with self.training_precision():
                outputs = reference_pass(self.model, train_rows, self.collator, config.per_device_eval_batch_size, head,
                                         self.accelerator, desc="reference pass (train)", kernel=self.logprob_kernel)
            self.stage_seconds["reference_pass"] = time.perf_counter() - started
            logger.info("reference pass over %d training rows: %.1f s", len(train_rows),
                        self.stage_seconds["reference_pass"])
            ref_logprobs, values = outputs.logprobs, outputs.values
            offsets = np.cumsum([0] + [len(lp) for lp in ref_logprobs]).tolist()
            tensors = {"logprobs": torch.cat(ref_logprobs)}
            if values is not None:
                tensors["values"] = torch.tensor(values)
            self.cache.save("reference_pass", key, {"offsets": offsets, "reports": reports}, tensors)

        advantages = None
        if config.uses_advantage:
            grouped = ~np.isnan(baselines) if baselines is not None else np.zeros(len(train), dtype=bool)
            baseline = np.asarray(values, dtype=np.float64) if values is not None else np.zeros(len(train))
            if baselines is not None:
                baseline = np.where(grouped, baselines, baseline)
            advantages = rewards - baseline
            check_reward_scale(advantages, [r.id for r in train], "training advantages (R - baseline)")
            stats = advantage_statistics(advantages)
            # how many rows each estimate covered: the other responses' mean (group) or V(x) (value)
            stats["estimates"] = {"group": int(grouped.sum()), "value": int((~grouped).sum())}
            if baselines is not None:
                stats["prompt_groups"] = len(prompt_groups(train))
            if fits_value:
                fit = reports.get("value_fit", {})
                stats["value_fit"] = {k: fit.get(k) for k in ("cv_r2", "cv_spearman", "informative")}
            if self.is_main:
                atomic_write_json(self.output_dir / "advantage_stats.json", stats)
            logger.info("training advantages: mean %.4f, median %.4f; %.1f%% negative (dropped by A-LoL); baseline: "
                        "the other responses' mean for %d rows, V(x) for %d", stats["mean"], stats["median"],
                        100 * stats["share_negative"], stats["estimates"]["group"], stats["estimates"]["value"])
        priority_values = advantages if config.uses_advantage else rewards
        weights = sampling_weights(config.sampling_strategy, priority_values, len(train))
        return TrainingSignal(rewards, advantages, ref_logprobs if config.uses_reference else None, weights)

    def _sft_rows(self, train: list[Record]) -> np.ndarray:
        """Check the grouped layout (consecutive candidates of one prompt, one flagged ``meta["sft"]``)."""
        size = self.args.group_size
        if len(train) % size:
            raise ConfigError(f"{len(train)} training rows do not split into groups of {size} candidates")
        flags = np.array([bool(r.meta.get("sft")) for r in train])
        for start in range(0, len(train), size):
            group = train[start:start + size]
            if len({json.dumps(r.prompt) for r in group}) != 1 or flags[start:start + size].sum() != 1:
                raise ConfigError(f"training rows {start}..{start + size - 1} ({group[0].id}...) are not one prompt's "
                                  f"{size} candidates with exactly one meta['sft'] row")
        return flags

