"""Online PPO for language models (the paper's RLHF baseline), on the library's engine.

One PPO step, as TRL 0.7.1's ``PPOTrainer.step`` that the original called:

1. draw ``batch_size`` training prompts (shuffled, reshuffled when exhausted) and **sample**
   a response for each from the policy (top-p, stop at EOS or the task's stop tokens);
2. score the post-processed text with the reward; scale the scores by running statistics
   (``use_score_scaling``, and subtract the running mean with ``use_score_norm``);
3. one forward pass of the policy (log-probs, per-token values from the value head) and of the
   frozen reference (log-probs) over the raw sampled tokens;
4. per-token rewards: the KL penalty to the reference on every token, the score on the last
   (:func:`lolrl.online.losses.ppo_token_rewards`); GAE advantages and returns
   (:func:`lolrl.online.losses.gae_advantages`), advantages whitened over the batch;
5. ``ppo_epochs`` passes over the batch in shuffled mini-batches, one optimizer step per
   ``mini_batch_size * gradient_accumulation_steps`` rollouts, minimising the clipped surrogate
   plus ``vf_coef`` times the clipped value loss;
6. the adaptive KL coefficient moves toward ``kl_target``.

The reference policy is never a second copy of the base model: with a LoRA adapter it is the same
model with the starting adapter loaded a second time, frozen (``--adapter_path``), or the adapter
disabled (a new adapter); a full fine-tune (small models) keeps a frozen copy.
The value head is a scalar linear layer (with dropout, as TRL's, when ``disable_dropout`` is False) on
the policy's last hidden states, one value per token. Validation every ``eval_steps`` generates greedily
on the validation prompts, scores them, and keeps the best adapter (and value head) in ``save_dir``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lolrl.engine.collation import Collator, TokenizedRow, Tokenizer
from lolrl.engine.config import ConfigError
from lolrl.engine.data import Record
from lolrl.engine.generation import GenerationSettings, generate_token_ids
from lolrl.engine.model_card import CardContents, HubSettings, push_best, write_card
from lolrl.engine.modeling import (
    LoraSettings,
    QuantizationSettings,
    base_load_dtype,
    check_logprob_kernel,
    choose_logprob_kernel,
    enable_activation_checkpointing,
    load_model,
    load_tokenizer,
    numerics_key,
    pad_rows,
    response_outputs,
    set_dropout,
)
from lolrl.engine.optim import build_optimizer
from lolrl.engine.reports import (
    plot_loss_curves,
    plot_validation_curve,
    summarize_generations,
)
from lolrl.engine.runtime import (
    backward,
    check_report_to,
    end_run,
    flat_config,
    make_accelerator,
    micro_batch,
    prepare_for_training,
    step_scheduler,
)
from lolrl.engine.validation import (
    BestModelKeeper,
    generate_and_score,
    gold_texts,
    reward_columns,
    scored_generations_check,
)
from lolrl.online.losses import (
    PPO_KL_PENALTIES,
    adaptive_kl_coef,
    gae_advantages,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from lolrl.utils import cache as cache_lib
from lolrl.utils.checkpoint import drop_log_tail, find_resumable, resume_training_state, run_key, save_training_state
from lolrl.utils.finite import StepGuard, check_finite_model
from lolrl.utils.io import append_jsonl, atomic_write_json, write_jsonl
from lolrl.utils.lock import check_output_paths, ensure_folder, hold_folders
from lolrl.utils.processes import decided_on_main, on_any_process
from lolrl.utils.seeding import seed_stage, stage_rng
from lolrl.utils.sharded import shards_parameters, trainable_state

logger = logging.getLogger(__name__)
REFERENCE_ADAPTER = "reference"


def _rollout_settings() -> GenerationSettings:
    # the original's rollouts: top-p 0.95, and the top-k 50 transformers applied when none was given
    return GenerationSettings(max_new_tokens=128, num_beams=1, repetition_penalty=1.0, do_sample=True, top_p=0.95,
                              top_k=50)


def _greedy_settings() -> GenerationSettings:
    return GenerationSettings(max_new_tokens=128, num_beams=1, repetition_penalty=1.0)


@dataclass
class PPOConfig:
    """PPO settings. Defaults are the original HH run's: its ``PPOConfig`` where it set a value,
    TRL 0.7.1's defaults elsewhere (see ``../shared/docs/hh-task.md`` §8)."""

    model_name: str
    output_dir: str
    adapter_path: str | None = None  # starting adapter; also the frozen reference
    tokenizer_name: str | None = None
    save_dir: str | None = None  # best adapter (+ value head); default OUTPUT/best_adapter
    cache_dir: str | None = None  # initial validation; default OUTPUT/cache
    lora: LoraSettings = field(default_factory=LoraSettings)  # r = 0 and no adapter: full fine-tune
    load_in_4bit: bool = False  # QLoRA (CUDA only)
    quantization: QuantizationSettings = field(default_factory=QuantizationSettings)  # how load_in_4bit quantises
    dtype: str = "fp32"
    # optimisation
    total_steps: int = 1000  # PPO steps (one rollout batch each)
    learning_rate: float = 2e-5
    batch_size: int = 16  # rollouts per PPO step (per process)
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    ppo_epochs: int = 4
    weight_decay: float = 0.0
    optim: str = "adamw_torch"  # a transformers optimizer name (lolrl.engine.optim)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    max_grad_norm: float | None = None  # TRL 0.7.1: no clipping
    lr_scheduler: str = "constant"  # over all optimizer steps (total_steps x ppo_epochs x batches per epoch)
    warmup_steps: int = 0  # optimizer steps of warmup, for the schedules that have one (not constant)
    # KL to the reference
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_penalty: str = "kl"
    # PPO losses and estimators
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    use_score_scaling: bool = True
    use_score_norm: bool = True
    score_clip: float | None = None
    ratio_threshold: float = 10.0  # skip a mini-batch whose mean ratio exceeds this (TRL)
    early_stopping: bool = False
    target_kl: float = 0.1  # with early_stopping: stop the step's epochs when policy KL > 1.5 x this
    value_head_dropout: float = 0.1  # with disable_dropout False (TRL's summary dropout)
    # dropout off in the policy and the value head, as the offline algorithms (OfflineRLConfig.disable_dropout) and
    # TRL's later PPO trainer: a mini-batch's first ratio to the rollout's log-probs is then exactly 1. False: the
    # model's dropout in the PPO epochs (TRL 0.7.1's PPOTrainer, which the original ran)
    disable_dropout: bool = True
    gradient_checkpointing: bool = False
    # the reference's log-probs: auto = Liger's fused kernel when installed on CUDA, else chunked; liger; chunked.
    # The policy's pass stays chunked: it needs the entropy, which Liger's kernel does not give.
    logprob_kernel: str = "auto"
    # generation
    max_prompt_length: int = 640
    rollout: GenerationSettings = field(default_factory=_rollout_settings)
    validation: GenerationSettings = field(default_factory=_greedy_settings)
    generation_batch_size: int = 16  # generation and reward batches
    # validation, logging, checkpoints
    eval_steps: int = 100
    eval_in_beginning: bool = True
    max_val_examples: int | None = None
    seed: int = 901
    logging_steps: int = 1
    report_to: str | None = None
    save_steps: int = 0  # 0: a checkpoint at every validation; N > 0: every N steps; -1: never
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | must
    stop_after_steps: int = -1
    use_cache: bool = True
    max_nonfinite_steps: int = 3  # optimizer steps in a row with a NaN/inf loss or gradient before the run stops
    hub: HubSettings = field(default_factory=HubSettings)  # --push_to_hub: the best adapter folder, with its card

    def __post_init__(self) -> None:
        self.save_dir = self.save_dir or str(Path(self.output_dir) / "best_adapter")
        self.cache_dir = self.cache_dir or str(Path(self.output_dir) / "cache")
        self.validate()

    @property
    def backward_batch_size(self) -> int:
        return self.mini_batch_size * self.gradient_accumulation_steps

    def validate(self) -> None:
        if self.total_steps < 1 or self.ppo_epochs < 1 or self.mini_batch_size < 1:
            raise ConfigError("total_steps, ppo_epochs and mini_batch_size must be >= 1")
        if self.batch_size < 2 or self.batch_size % self.backward_batch_size:
            raise ConfigError(f"the rollout batch ({self.batch_size}) must be >= 2 and a multiple of mini_batch_size x "
                              f"gradient_accumulation_steps ({self.backward_batch_size})")
        check_logprob_kernel(self.logprob_kernel)
        self.quantization.check()
        self.hub.check()
        check_report_to(self.report_to)
        if self.kl_penalty not in PPO_KL_PENALTIES:
            raise ConfigError(f"kl_penalty must be one of {', '.join(PPO_KL_PENALTIES)}")
        if self.init_kl_coef < 0 or (self.adap_kl_ctrl and (self.kl_target <= 0 or self.kl_horizon <= 0)):
            raise ConfigError("init_kl_coef must be >= 0; the adaptive controller needs kl_target and kl_horizon > 0")
        if self.resume not in ("auto", "never", "must"):
            raise ConfigError("resume must be auto, never or must")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_output_paths({"output folder": self.output_dir, "cache folder": self.cache_dir}, self.save_dir,
                           {"starting model": self.model_name, "adapter": self.adapter_path})
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if not self.rollout.do_sample:
            logger.warning("PPO rollouts without sampling: every rollout of a prompt is the same")

    def to_dict(self) -> dict:
        return {**asdict(self), "hub": self.hub.shown()}

    def card_settings(self) -> dict:
        """The settings the model card lists (:mod:`lolrl.engine.model_card`)."""
        lora = self.lora
        return {"algorithm": "ppo", "cliprange": self.cliprange, "cliprange_value": self.cliprange_value,
                "init_kl_coef": self.init_kl_coef, "adap_kl_ctrl": self.adap_kl_ctrl, "kl_target": self.kl_target,
                "kl_penalty": self.kl_penalty, "vf_coef": self.vf_coef, "gamma": self.gamma, "lam": self.lam,
                "learning_rate": self.learning_rate, "optim": self.optim, "lr_scheduler": self.lr_scheduler,
                "total_steps": self.total_steps, "rollouts per step (per process)": self.batch_size,
                "mini_batch_size": self.mini_batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "ppo_epochs": self.ppo_epochs, "precision (dtype)": self.dtype,
                "LoRA": f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}" if lora.enabled
                else "the starting adapter" if self.adapter_path else "none (all weights trained)",
                "rollout decoding": f"top_p={self.rollout.top_p}, top_k={self.rollout.top_k}, "
                                    f"temperature={self.rollout.temperature}", "seed": self.seed}


class ValueHeadModel(nn.Module):
    """The policy and a per-token scalar value head on its last hidden states (TRL's
    ``AutoModelForCausalLMWithValueHead``: dropout, then a linear layer to one value)."""

    def __init__(self, policy: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.policy = policy
        config = policy.config.get_text_config() if hasattr(policy.config, "get_text_config") else policy.config
        self.value_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(config.hidden_size, 1))

    def forward(self, batch: dict):
        """Per response token: log-prob, entropy and value of the state before it (:func:`token_outputs`)."""
        return token_outputs(self.policy, batch, self.value_head)


def token_outputs(model, batch: dict, value_head=None):
    """Per response token of a padded causal batch (:class:`lolrl.engine.collation.Collator`): log-prob,
    entropy of the policy's distribution, and (with ``value_head``) value of the state before the token.
    Each is ``[rows, longest response]``, 0 past a row's end; also returns that mask. The output layer
    runs only on the response positions, in chunks (:func:`lolrl.engine.modeling.response_outputs`)."""
    out = response_outputs(model, batch, entropy=True, scored_hidden=value_head is not None)
    value = None
    if value_head is not None:
        hidden = out.scored_hidden.to(value_head[1].weight.dtype)
        value = pad_rows(value_head(hidden).squeeze(-1).float(), batch["response_lengths"].tolist())
    return out.logprobs, out.entropy, value, out.mask


class RunningMoments:
    """Running mean and standard deviation of the scores (TRL's ``RunningMoments``, Chan et al.'s
    parallel update), for ``use_score_scaling``."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, std: float = 1.0, count: float = 1e-24):
        self.mean, self.var, self.std, self.count = mean, var, std, count

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = float(xs_mean) - self.mean
        total = self.count + n
        old_sum = self.var * self.count + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var = (old_sum + float(xs_var) * n) / total
        self.std = math.sqrt(self.var * total / (total - 1))
        self.count = total

    def state(self) -> dict:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}


class PPOTrainer:
    """Online PPO with a reward function of TRL's signature (``f(prompts, completions, **columns)``,
    wrapped in :class:`lolrl.engine.rewards.RewardFunction`; ``final_reward`` is the score).

    >>> trainer = PPOTrainer(PPOConfig(model_name="path/to/sft", output_dir="out"), train, val, reward)
    >>> best = trainer.run()
    """

    def __init__(self, config: PPOConfig, train: list[Record], val: list[Record], reward, accelerator=None,
                 postprocess=None):
        if not train:
            raise ConfigError("PPO needs training prompts")
        self.config, self.train_records, self.reward = config, train, reward
        self.val_records = val[: config.max_val_examples] if config.max_val_examples else val
        self.postprocess = postprocess  # applied to every generation before scoring (e.g. the HH stop rule)
        self.accelerator = accelerator or make_accelerator(config, config.gradient_accumulation_steps)
        self.is_main = self.accelerator.is_main_process
        self.output_dir = ensure_folder(config.output_dir, "output folder")
        self.cache = cache_lib.Cache(config.cache_dir, enabled=config.use_cache, accelerator=self.accelerator)
        self.tokenizer = load_tokenizer(config.model_name, config.tokenizer_name)
        self.row_tokenizer = Tokenizer(self.tokenizer, False, config.max_prompt_length, config.rollout.max_new_tokens)
        self.collator = Collator(self.tokenizer.pad_token_id, False)
        self.kl_coef = config.init_kl_coef
        self.running = RunningMoments()
        self.global_step = 0
        self.prompt_epoch, self.prompt_position = 0, 0
        self.keeper = BestModelKeeper(self.output_dir, config.save_dir, "final_reward")
        self.best_state: dict[str, torch.Tensor] | None = None
        self.model = self.ref_model = None
        self.ref_adapter = False
        self.guard = StepGuard(config.max_nonfinite_steps, self.accelerator, "PPO")

    # ----------------------------------------------------------------------------------- set-up
    def _load(self) -> None:
        config, acc = self.config, self.accelerator
        if config.load_in_4bit and config.model_name and not (config.lora.enabled or config.adapter_path):
            raise ConfigError("4-bit loading trains a LoRA adapter: give --adapter_path or LoRA settings")
        policy = load_model(config.model_name, lora=config.lora, adapter_path=config.adapter_path,
                            dtype=base_load_dtype(config.dtype, config.lora, config.adapter_path, config.load_in_4bit),
                            load_in_4bit=config.load_in_4bit, quantization=config.quantization,
                            device_index=acc.local_process_index)
        if getattr(policy.config, "is_encoder_decoder", False):
            raise ConfigError("PPO here is for decoder-only models")
        if config.gradient_checkpointing:
            enable_activation_checkpointing(policy)
        peft = hasattr(policy, "peft_config")
        if peft and config.adapter_path:
            # The reference is the starting adapter, loaded a second time next to the trained one (a few MB),
            # never a second base model.
            policy.load_adapter(config.adapter_path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            policy.set_adapter("default")
            self.ref_adapter = True
        elif not peft:
            self.ref_model = copy.deepcopy(policy).eval().requires_grad_(False)  # full fine-tune: a frozen copy
        quantized = getattr(policy, "is_loaded_in_4bit", False) or getattr(
            getattr(policy, "base_model", None), "is_loaded_in_4bit", False)
        model = ValueHeadModel(policy, config.value_head_dropout)
        if config.disable_dropout:
            set_dropout(model, 0.0)
        model.value_head.to(acc.device)
        if not quantized:
            model.to(acc.device)
            if self.ref_model is not None:
                self.ref_model.to(acc.device)
        self.model = model
        self.quantized = quantized
        self.logprob_kernel, why = choose_logprob_kernel(policy, config.logprob_kernel, acc.device,
                                                         sharded=shards_parameters(acc))
        logger.info("reference log-probs: %s (%s)", self.logprob_kernel, why)

    def _unwrapped(self) -> ValueHeadModel:
        return self.accelerator.unwrap_model(self.model)

    def _policy(self):
        return self._unwrapped().policy

    @contextlib.contextmanager
    def _reference(self):
        """The frozen reference policy for the KL penalty."""
        policy = self._policy()
        if self.ref_model is not None:
            yield self.ref_model
        elif self.ref_adapter:
            policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
            try:
                yield policy
            finally:
                policy.set_adapter("default")
        else:
            with policy.disable_adapter():
                yield policy

    def _optimizer(self):
        """The prepared model and optimizer, and the schedule over every optimizer step of the run (not
        prepared: see :func:`prepare_for_training`; stepped once per optimizer step)."""
        from transformers import get_scheduler

        config = self.config
        optimizer = build_optimizer(self.model, config.optim, config.learning_rate,
                                    (config.adam_beta1, config.adam_beta2), config.adam_eps, config.weight_decay)
        self.model, optimizer = prepare_for_training(self.accelerator, self.model, optimizer, config.max_grad_norm,
                                                     device_placement=[not self.quantized, True])
        steps = config.total_steps * config.ppo_epochs * (config.batch_size // config.backward_batch_size)
        return optimizer, get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                        num_training_steps=steps)

    # ---------------------------------------------------------------------------------- rollouts
    def _next_prompts(self) -> list[Record]:
        """This process's share of the next global batch; every process walks the same permutation."""
        acc, n = self.accelerator, len(self.train_records)
        chosen = []
        for _ in range(self.config.batch_size * acc.num_processes):
            if self.prompt_position >= n:
                self.prompt_epoch, self.prompt_position = self.prompt_epoch + 1, 0
            order = self._permutation(self.prompt_epoch)
            chosen.append(int(order[self.prompt_position]))
            self.prompt_position += 1
        return [self.train_records[i] for i in chosen[acc.process_index::acc.num_processes]]

    def _permutation(self, epoch: int) -> np.ndarray:
        """The prompt order of a pass over the training prompts: a function of (seed, pass) only."""
        if getattr(self, "_order", (None,))[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.config.seed, epoch]).permutation(len(self.train_records)))
        return self._order[1]

    def _score(self, records: list[Record], completions: list[str]) -> list[float]:
        out = self.reward(prompts=[r.prompt for r in records], completions=completions,
                          batch_size=self.config.generation_batch_size, show_progress=False,
                          **reward_columns(records))
        return out["final_reward"]

    def _collate(self, rows: list[TokenizedRow]) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in self.collator(rows).items()}

    @torch.no_grad()
    def rollout(self, records: list[Record]) -> dict:
        """Sample, score, and compute everything the PPO epochs need (old log-probs, values,
        reference log-probs, per-token rewards, advantages, returns)."""
        config, acc = self.config, self.accelerator
        prompts = [TokenizedRow(i, self.row_tokenizer.prompt_ids(r.prompt), []) for i, r in enumerate(records)]
        responses = generate_token_ids(self._policy(), self.tokenizer, prompts, config.rollout,
                                       config.generation_batch_size, acc.device)
        texts = [t.strip() for t in self.tokenizer.batch_decode(responses, skip_special_tokens=True)]
        completions = [self.postprocess(t) for t in texts] if self.postprocess else texts
        raw_scores = torch.tensor(self._score(records, completions), dtype=torch.float32, device=acc.device)
        scores = raw_scores
        if config.use_score_scaling:
            self.running.update(acc.gather(raw_scores))
            scale = self.running.std + torch.finfo(torch.float32).eps
            scores = ((raw_scores - self.running.mean) if config.use_score_norm else raw_scores) / scale
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)
        rows = [TokenizedRow(p.index, p.prompt_ids, r) for p, r in zip(prompts, responses)]
        old_logprobs, values, ref_logprobs = [], [], []
        self.model.eval()
        for start in range(0, len(rows), config.mini_batch_size):
            batch = self._collate(rows[start:start + config.mini_batch_size])
            with acc.autocast():
                lp, _, v, _ = self._unwrapped()(batch)
                with self._reference() as reference:
                    ref_lp = response_outputs(reference, batch, kernel=self.logprob_kernel).logprobs
            old_logprobs += list(lp)
            values += list(v)
            ref_logprobs += list(ref_lp)
        lengths = torch.tensor([len(r) for r in responses], device=acc.device)
        width = int(lengths.max())

        def stack(rows_):
            return torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0])) for t in rows_])

        mask = (torch.arange(width, device=acc.device)[None, :] < lengths[:, None]).float()
        old_logprobs, values = stack(old_logprobs) * mask, stack(values) * mask
        ref_logprobs = stack(ref_logprobs) * mask
        token_rewards, kl = ppo_token_rewards(scores, old_logprobs, ref_logprobs, mask, self.kl_coef, config.kl_penalty)
        advantages, returns = gae_advantages(token_rewards, values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask
        log_ratio = (old_logprobs - ref_logprobs) * mask
        return {"rows": rows, "completions": completions, "raw_scores": raw_scores, "scores": scores, "mask": mask,
                "old_logprobs": old_logprobs, "values": values, "ref_logprobs": ref_logprobs,
                "advantages": advantages, "returns": returns, "kl_per_row": log_ratio.sum(-1),
                "non_score_reward": (-self.kl_coef * kl).sum(-1), "lengths": lengths.float()}

    # ------------------------------------------------------------------------------- optimisation
    def ppo_update(self, data: dict, optimizer, scheduler) -> dict[str, float]:
        """``ppo_epochs`` passes over the rollouts in shuffled mini-batches; returns mean statistics."""
        config, acc = self.config, self.accelerator
        n = len(data["rows"])
        stats: dict[str, list[float]] = {}
        self.model.train()
        stop = False
        for _ in range(config.ppo_epochs):
            order = torch.randperm(n).tolist()
            for start in range(0, n, config.backward_batch_size):
                group = order[start:start + config.backward_batch_size]
                minis = [group[i:i + config.mini_batch_size] for i in range(0, len(group), config.mini_batch_size)]
                for j, idx in enumerate(minis):
                    with micro_batch(acc, self.model, last=j == len(minis) - 1):
                        with acc.autocast():
                            batch = self._collate([data["rows"][i] for i in idx])
                            logprobs, entropy, vpred, mask = self.model(batch)
                            width = mask.shape[1]

                            def take(key, idx=idx, width=width):
                                return data[key][idx, :width]

                            pg_loss, pg_stats = ppo_policy_loss(logprobs, take("old_logprobs"), take("advantages"),
                                                                mask, config.cliprange)
                            vf_loss, vf_stats = ppo_value_loss(vpred, take("values"), take("returns"), mask,
                                                               config.cliprange_value)
                            loss = pg_loss + config.vf_coef * vf_loss
                            skipped = float(pg_stats["ratio"]) > config.ratio_threshold
                            if skipped:  # TRL: a mini-batch far off-policy contributes nothing
                                logger.warning("mean ratio %.2f > %.2f: mini-batch skipped", float(pg_stats["ratio"]),
                                               config.ratio_threshold)
                                loss = loss * 0.0
                        backward(acc, loss, len(minis))
                    for name, value in {"policy_loss": pg_loss, "value_loss": vf_loss, "loss": loss,
                                        "entropy": masked_mean(entropy.detach(), mask), **pg_stats,
                                        **vf_stats, "skipped": torch.tensor(float(skipped))}.items():
                        stats.setdefault(name, []).append(float(value.detach()))
                    too_far = float(pg_stats["policykl"]) > 1.5 * config.target_kl
                    if config.early_stopping and on_any_process(self.accelerator, too_far):
                        stop = True
                        break
                if stop:
                    optimizer.zero_grad()
                    break
                losses = stats["loss"][-len(minis):]
                if self.guard.allow_step(losses, self.model, self.global_step + 1):
                    if config.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    step_scheduler(acc, scheduler)
                optimizer.zero_grad()
            if stop:
                logger.info("early stopping: policy KL above 1.5 x target_kl (%.3g)", config.target_kl)
                break
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def step(self, optimizer, scheduler) -> dict[str, float]:
        """One PPO step: rollouts, the update, the KL controller; returns the step's log entry."""
        config, acc = self.config, self.accelerator
        records = self._next_prompts()
        data = self.rollout(records)
        kl_coef = self.kl_coef
        update = self.ppo_update(data, optimizer, scheduler)
        update["lr"] = scheduler.get_last_lr()[0]  # after the step's optimizer steps, as the offline trainer logs it
        kl = float(acc.gather(data["kl_per_row"]).mean())
        if config.adap_kl_ctrl:
            self.kl_coef = adaptive_kl_coef(self.kl_coef, kl, config.kl_target, config.kl_horizon,
                                            config.batch_size * acc.num_processes)
        scores = acc.gather(data["raw_scores"])
        mask = data["mask"]
        return {"reward": float(scores.mean()), "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
                "score_scaled": float(data["scores"].mean()), "kl": kl, "kl_coef": kl_coef,
                "non_score_reward": float(data["non_score_reward"].mean()),
                "response_length": float(data["lengths"].mean()),
                "advantage_abs": float(masked_mean(data["advantages"].abs(), mask)),
                "returns_mean": float(masked_mean(data["returns"], mask)),
                "value_mean": float(masked_mean(data["values"], mask)), **update}

    # ------------------------------------------------------------------------------- validation
    def _val_rows(self) -> list[TokenizedRow]:
        return [TokenizedRow(i, self.row_tokenizer.prompt_ids(r.prompt), []) for i, r in enumerate(self.val_records)]

    def _generate_and_score(self, desc: str) -> tuple[list[str], dict[str, list[float]]]:
        return generate_and_score(self._policy(), self.tokenizer, self.val_records, self._val_rows(),
                                  self.config.validation, self.config.generation_batch_size, self.accelerator,
                                  self.reward, self.postprocess, desc)

    def _initial_generations(self):
        """The starting policy's validation generations (cached under a key of everything they depend on)."""
        config = self.config
        key = cache_lib.hash_json({
            "stage": "ppo_initial_validation", **numerics_key(config),
            "val": cache_lib.records_digest(self.val_records), "reward": self.reward.cache_key(),
            "generation": config.validation.as_dict()})
        hit = self.cache.load("ppo_initial_validation", key, scored_generations_check(len(self.val_records)))
        if hit is not None:
            return hit[0]["completions"], hit[0]["rewards"]
        with stage_rng(config.seed, "validation_0"):
            completions, rewards = self._generate_and_score("validation (start)")
        self.cache.save("ppo_initial_validation", key, {"completions": completions, "rewards": rewards})
        return completions, rewards

    def validate(self, step: int, generations=None) -> float:
        """Mean validation reward; a new best is saved to ``save_dir``."""
        with stage_rng(self.config.seed, f"validation_{step}"):
            completions, rewards = generations or self._generate_and_score("validation")
        summary = summarize_generations(completions, rewards,
                                        golds=gold_texts(self.val_records, (self.tokenizer.eos_token,)))
        if self.is_main:
            write_jsonl(self.output_dir / "val_generations.jsonl",
                        [{"id": r.id, "response": c, **{k: v[i] for k, v in rewards.items()}}
                         for i, (r, c) in enumerate(zip(self.val_records, completions))])
        measure = summary[self.keeper.metric]
        if self.keeper.record(step, None, summary, measure, self._save_best, self.accelerator) and self.is_main:
            self.write_card()
        return measure

    def write_card(self) -> None:
        """SAVE/README.md, the best adapter's model card (main process)."""
        config = self.config
        write_card(config.save_dir, CardContents(
            base_model=config.model_name, algorithm="ppo", trainer="PPOTrainer", settings=config.card_settings(),
            adapter=config.lora.enabled or config.adapter_path is not None, start_adapter=config.adapter_path,
            rows={"train prompts": len(self.train_records), "validation": len(self.val_records)},
            data_digest=self._train_digest, tags=["ppo", "online-rl"]))

    def _save_best(self) -> None:
        self.best_state = self._trainable_state()
        self.save_model(self.config.save_dir)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return trainable_state(self.accelerator, self.model)

    def save_model(self, directory: str) -> None:
        """The adapter (or the whole model), the value head and the tokenizer; the main process writes
        (a refusal to save non-finite weights stops every process)."""
        decided_on_main(self.accelerator, lambda: self._write_model(directory))

    def _write_model(self, directory: str) -> None:
        check_finite_model(self._unwrapped(), f"the model for {directory}")
        from safetensors.torch import save_file

        policy = self._policy()
        if self.ref_adapter:
            policy.save_pretrained(directory, selected_adapters=["default"])
        else:
            policy.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self._unwrapped().value_head.state_dict().items()},
                  str(Path(directory) / "value_head.safetensors"))
        self.tokenizer.save_pretrained(directory)

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @functools.cached_property
    def _train_digest(self) -> str:
        return cache_lib.records_digest(self.train_records)

    @functools.cached_property
    def _run_key(self) -> str:
        return run_key(self.config.to_dict(), train=self._train_digest,
                       val=cache_lib.records_digest(self.val_records))

    def find_checkpoint(self) -> Path | None:
        return find_resumable(self.checkpoint_dir, self.config.resume, self._run_key, self.accelerator)

    def _save_checkpoint(self, optimizer, scheduler) -> None:
        trainable = self._trainable_state()  # a collective under FSDP / ZeRO-3: every process gathers
        progress = {"prompt_epoch": self.prompt_epoch, "prompt_position": self.prompt_position,
                    "best_measure": self.keeper.best if math.isfinite(self.keeper.best) else None,
                    "kl_coef": self.kl_coef, "running": self.running.state(), "run_key": self._run_key}
        save_training_state(self.accelerator, self.checkpoint_dir, self.global_step, trainable, self.model, optimizer,
                            scheduler, progress, self.best_state, self.config.keep_checkpoints)

    def _resume(self, checkpoint: Path, optimizer, scheduler) -> None:
        state, best = resume_training_state(self.accelerator, checkpoint, self.model, optimizer, scheduler)
        progress = state["progress"]
        self.global_step = state["step"]
        self.prompt_epoch, self.prompt_position = progress["prompt_epoch"], progress["prompt_position"]
        self.keeper.best = -math.inf if progress["best_measure"] is None else progress["best_measure"]
        self.kl_coef = progress["kl_coef"]
        self.running = RunningMoments(**progress["running"])
        self.best_state = best
        if self.is_main:
            drop_log_tail(self.output_dir, self.global_step)

    # -------------------------------------------------------------------------------------- run
    def _end_run(self) -> None:
        """The wrapped (DDP) model goes before the process group does (see :func:`end_run`)."""
        self.model = self.accelerator.unwrap_model(self.model)
        end_run(self.accelerator)

    def run(self) -> dict:
        """Train for ``total_steps`` PPO steps with validation; returns the best validation summary.
        The output and save folders are locked for the run (a second run on them is refused)."""
        with hold_folders({"output folder": self.output_dir, "save folder": self.config.save_dir}, self.is_main):
            return self._run()

    def _run(self) -> dict:
        config, acc = self.config, self.accelerator
        if self.is_main:
            atomic_write_json(self.output_dir / "args.json", config.to_dict())
        self._load()
        optimizer, scheduler = self._optimizer()
        if config.report_to not in (None, "none"):
            acc.init_trackers("lolrl_ppo", config=flat_config(config.to_dict()))
        checkpoint = self.find_checkpoint()
        if checkpoint is not None:
            self._resume(checkpoint, optimizer, scheduler)
        else:
            if config.eval_in_beginning and self.val_records:
                self.validate(0, self._initial_generations())
            seed_stage(config.seed, "train")  # the rollouts' stream, whether the validation above was cached or not
        logger.info("PPO: %d steps of %d rollouts (x%d processes), %d epochs of mini-batches of %d, reference: %s",
                    config.total_steps, config.batch_size, acc.num_processes, config.ppo_epochs,
                    config.mini_batch_size, "frozen copy" if self.ref_model is not None else
                    "starting adapter (frozen)" if self.ref_adapter else "adapter disabled")
        progress = tqdm(total=config.total_steps, initial=self.global_step, desc="ppo",
                        disable=not acc.is_local_main_process)
        started = time.time()
        while self.global_step < config.total_steps:
            entry = self.step(optimizer, scheduler)
            self.global_step += 1
            progress.update(1)
            progress.set_postfix({k: f"{entry[k]:.3g}" for k in ("reward", "kl", "kl_coef", "value_loss")})
            if self.global_step % config.logging_steps == 0:
                entry = {"step": self.global_step, "elapsed_s": round(time.time() - started, 2), **entry}
                if self.is_main:
                    append_jsonl(self.output_dir / "train_log.jsonl", entry)
                acc.log({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=self.global_step)
            validated = bool(self.val_records) and config.eval_steps > 0 and (
                self.global_step % config.eval_steps == 0 or self.global_step == config.total_steps)
            if validated:
                self.validate(self.global_step)
            stopping = self.global_step == config.stop_after_steps
            every = config.save_steps
            if stopping or (every == 0 and validated) or (every > 0 and self.global_step % every == 0):
                self._save_checkpoint(optimizer, scheduler)
            if stopping:
                progress.close()
                logger.info("stopped after %d PPO steps as asked; run the same command to resume", self.global_step)
                self._end_run()
                return {}
        progress.close()
        self.save_model(str(self.output_dir / "final_adapter"))
        if self.is_main:
            plot_loss_curves(self.output_dir / "train_log.jsonl", self.output_dir / "train_curves.png",
                             keys=["reward", "kl", "kl_coef", "entropy", "policy_loss", "value_loss", "clipfrac",
                                   "approxkl", "response_length"])
            plot_validation_curve(self.output_dir / "validation_stats.jsonl", self.output_dir / "validation_curve.png")
        try:
            if config.hub.push_to_hub:
                decided_on_main(acc, lambda: push_best(config.save_dir, config.hub, self.output_dir.resolve().name,
                                                       "ppo", "reward", self.keeper.best, what="adapter"))
        finally:
            self._end_run()
        best = {"best_step_measure": self.keeper.best}
        if (Path(config.save_dir) / "best.json").exists():
            best = json.loads((Path(config.save_dir) / "best.json").read_text())
        return best
