"""Online PPO for language models (the paper's RLHF baseline), on the library's engine.

One PPO step, as TRL 0.7.1's ``PPOTrainer.step`` that the original called:

1. draw ``rollout_batch_size`` training prompts (shuffled, reshuffled when exhausted) and **sample**
   a response for each from the policy (top-p, stop at EOS or the task's stop tokens);
2. score the post-processed text with the reward; scale the scores by running statistics
   (``use_score_scaling``, and subtract the running mean with ``use_score_norm``);
3. one forward pass of the policy (log-probs, per-token values from the value head) and of the
   frozen reference (log-probs) over the raw sampled tokens;
4. per-token rewards: the KL penalty to the reference on every token, the score on the last
   (:func:`lolrl.online.losses.ppo_token_rewards`); GAE advantages and returns
   (:func:`lolrl.online.losses.gae_advantages`), advantages whitened over the batch;
5. ``ppo_epochs`` passes over the batch in shuffled mini-batches, one optimizer step per
   ``per_device_train_batch_size * gradient_accumulation_steps`` rollouts, minimising the clipped surrogate
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
from torch import nn
from tqdm.auto import tqdm

from lolrl.engine.collation import Collator, TokenizedRow, Tokenizer
from lolrl.engine.config import ConfigError, RunConfig
from lolrl.engine.data import Record
from lolrl.engine.generation import GenerationSettings, generate_token_ids, with_stop_texts
from lolrl.engine.model_card import CardContents, push_best, write_card
from lolrl.engine.modeling import (
    LOGPROB_KERNEL_HELP,
    LOGPROB_KERNELS,
    base_load_dtype,
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
    end_run,
    flat_config,
    make_accelerator,
    micro_batch,
    prepare_for_training,
    report_to_list,
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
from lolrl.utils.cli import setting
from lolrl.utils.finite import StepGuard, check_finite_model
from lolrl.utils.io import append_jsonl, atomic_write_json, write_jsonl
from lolrl.utils.lock import check_output_paths, ensure_folder, hold_folders
from lolrl.utils.processes import decided_on_main, on_any_process
from lolrl.utils.seeding import seed_stage, stage_rng
from lolrl.utils.sharded import shards_parameters, trainable_state

logger = logging.getLogger(__name__)
REFERENCE_ADAPTER = "reference"


@dataclass
class PPOConfig(RunConfig):
    """PPO settings: a ``transformers.TrainingArguments`` (as TRL's own PPO configs were) holding PPO's settings,
    with the vocabulary of :class:`lolrl.engine.config.OfflineRLConfig` for what they share (``max_steps``,
    ``per_device_train_batch_size``, ``adam_epsilon``, ``lr_scheduler_type``, ``lora``, ``quantization``, ...).
    PPO keeps its own rollout loop (:class:`PPOTrainer`): it reads these settings, not the Trainer. Defaults are
    the original HH run's: its ``PPOConfig`` where it set a value, TRL 0.7.1's defaults elsewhere (see
    docs/hh.md, "Online: PPO, GRPO, RLOO")."""

    # ------------------------------------------------------------------ TrainingArguments, PPO's defaults
    output_dir: str | None = setting(None, "logs, validation statistics, checkpoints; the best adapter goes to "
                                           "OUTPUT/best_adapter")
    max_steps: int = setting(1000, "PPO steps (one rollout batch each)", min=1)
    per_device_train_batch_size: int = setting(4, "rollouts per mini-batch (TRL's mini_batch_size)", min=1)
    gradient_accumulation_steps: int = setting(4, "mini-batches per optimizer step", min=1)
    per_device_eval_batch_size: int = setting(16, "generation and reward batches", min=1)
    learning_rate: float = setting(2e-5, "learning rate", min=0.0)
    weight_decay: float = setting(0.0, "decoupled weight decay", min=0.0)
    adam_epsilon: float = setting(1e-6, "Adam epsilon")
    max_grad_norm: float = setting(0.0, "gradient-norm clip at each optimizer step (0: none, as TRL 0.7.1)", min=0.0)
    lr_scheduler_type: str = setting("constant", "a transformers scheduler name, over all optimizer steps (max_steps "
                                                 "x ppo_epochs x optimizer steps per epoch)")
    warmup_steps: float = setting(0, "optimizer steps of warmup, for the schedules that have one", min=0)
    seed: int = setting(901, "seed of the rollouts, the prompt order and every stage")
    logging_steps: float = setting(1, "log every N PPO steps", min=1)
    eval_steps: float | None = setting(100, "validate every N PPO steps (and at the last; 0: never)", min=0)
    eval_on_start: bool = setting(True, "validate the starting policy first")
    save_steps: float = setting(0, "checkpoint every N PPO steps; 0: at every validation; -1 (or save_strategy "
                                   "'no'): never")

    # ------------------------------------------------------------------------------------- model
    model_name: str | None = setting(None, "the starting policy: hub id or path", aliases=["--model_name_or_path"])
    adapter_path: str | None = setting(None, "starting adapter; also the frozen reference")
    save_dir: str | None = setting(None, "the best adapter and its value head (default OUTPUT/best_adapter)")
    cache_dir: str | None = setting(None, "the starting policy's validation generations (default OUTPUT/cache)")
    stage_cache: bool = setting(True, "reuse the cached starting-policy validation; --no_cache recomputes it",
                                no_aliases=["--no_cache"])
    # dropout off in the policy and the value head, as the offline algorithms and TRL's later PPO trainer: a
    # mini-batch's first ratio to the rollout's log-probs is then exactly 1
    disable_dropout: bool = setting(True, "dropout off in the policy and the value head (a mini-batch's first ratio "
                                          "is exactly 1); --keep_dropout keeps the model's dropout in the PPO epochs "
                                          "(TRL 0.7.1's PPOTrainer, which the original ran)",
                                    no_aliases=["--keep_dropout"])
    logprob_kernel: str = setting("auto", LOGPROB_KERNEL_HELP + " (the reference's log-probs; the policy's pass "
                                          "stays chunked: it needs the entropy)", choices=LOGPROB_KERNELS)
    max_prompt_length: int = setting(640, "prompt tokens kept (the last ones)", min=1)

    # --------------------------------------------------------------------------------------- PPO
    rollout_batch_size: int = setting(16, "rollouts per PPO step (per process)", min=2,
                                      aliases=["--ppo_rollout_batch_size"])
    ppo_epochs: int = setting(4, "PPO epochs per rollout batch", min=1)
    init_kl_coef: float = setting(0.2, "initial KL coefficient", min=0.0, aliases=["--kl_beta"])
    adap_kl_ctrl: bool = setting(True, "adapt the KL coefficient toward --kl_target (--no_adap_kl_ctrl: fixed)")
    kl_target: float = setting(6.0, "target KL of the adaptive controller")
    kl_horizon: float = setting(10000.0, "horizon of the adaptive controller")
    kl_penalty: str = setting("kl", "per-token KL estimate", choices=PPO_KL_PENALTIES)
    cliprange: float = setting(0.2, "clip range of the probability ratio", min=0.0, aliases=["--ppo_clip"])
    cliprange_value: float = setting(0.2, "clip range of the value loss")
    vf_coef: float = setting(0.1, "value-loss coefficient")
    gamma: float = setting(1.0, "discount")
    lam: float = setting(0.95, "GAE lambda")
    whiten_advantages: bool = setting(True, "whiten the advantages over the rollout batch")
    use_score_scaling: bool = setting(True, "scale scores by their running std")
    use_score_norm: bool = setting(True, "with scaling: also subtract their running mean")
    score_clip: float | None = setting(None, "clip the (scaled) scores to [-c, c]", min=0.0)
    ratio_threshold: float = setting(10.0, "skip a mini-batch whose mean ratio exceeds this (TRL)")
    early_stopping: bool = setting(False, "end a step's PPO epochs once the policy KL exceeds 1.5 x --target_kl")
    target_kl: float = setting(0.1, "with --early_stopping: the KL that ends a step's PPO epochs (x 1.5)")
    value_head_dropout: float = setting(0.1, "the value head's dropout with --keep_dropout (TRL's summary dropout)")
    # the original's rollouts: top-p 0.95, and the top-k 50 transformers applied when none was given
    rollout: GenerationSettings = setting(
        GenerationSettings(max_new_tokens=128, num_beams=1, repetition_penalty=1.0, do_sample=True, top_p=0.95,
                           top_k=50), "rollout decoding (its length and stops are validation's too)", flatten="")
    validation: GenerationSettings | None = setting(None, "validation decoding (the Python API's); none: the rollout "
                                                          "settings, greedy")

    # ----------------------------------------------------------------------- validation, checkpoints
    max_val_examples: int | None = setting(None, "validate on the first N validation prompts only", min=1)
    stop_after_steps: int = setting(-1, "stop, checkpointed, after this many PPO steps; the same command resumes")

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("PPOConfig needs a model_name (the starting policy)")
        super().__post_init__()

    def complete(self) -> None:
        if self.validation is None:  # greedy, with the rollouts' length and stops
            self.validation = dataclasses.replace(self.rollout, do_sample=False, num_beams=1, top_p=1.0, top_k=0,
                                                  temperature=1.0)
        if self.validation.max_new_tokens is None:
            self.validation = dataclasses.replace(self.validation, max_new_tokens=self.rollout.max_new_tokens)
        self.eval_steps = self.eval_steps or 0  # 0 (or TrainingArguments' None): never
        self.save_dir = self.save_dir or str(Path(self.output_dir) / "best_adapter")
        self.cache_dir = self.cache_dir or str(Path(self.output_dir) / "cache")

    @property
    def backward_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    @property
    def checkpoint_never(self) -> bool:
        return self.save_strategy == "no"

    def validate(self) -> None:
        super().validate()
        if self.max_steps < 1 or self.ppo_epochs < 1 or self.per_device_train_batch_size < 1:
            raise ConfigError("max_steps, ppo_epochs and per_device_train_batch_size must be >= 1")
        if self.rollout_batch_size < 2 or self.rollout_batch_size % self.backward_batch_size:
            raise ConfigError(f"the rollout batch ({self.rollout_batch_size}) must be >= 2 and a multiple of "
                              f"per_device_train_batch_size x gradient_accumulation_steps ({self.backward_batch_size})")
        if self.rollout.max_new_tokens is None:
            raise ConfigError("the rollouts need a max_new_tokens")
        if self.kl_penalty not in PPO_KL_PENALTIES:
            raise ConfigError(f"kl_penalty must be one of {', '.join(PPO_KL_PENALTIES)}")
        if self.init_kl_coef < 0 or (self.adap_kl_ctrl and (self.kl_target <= 0 or self.kl_horizon <= 0)):
            raise ConfigError("init_kl_coef must be >= 0; the adaptive controller needs kl_target and kl_horizon > 0")
        check_output_paths({"output folder": self.output_dir, "cache folder": self.cache_dir}, self.save_dir,
                           {"starting model": self.model_name, "adapter": self.adapter_path})
        if not self.rollout.do_sample:
            logger.warning("PPO rollouts without sampling: every rollout of a prompt is the same")

    def card_settings(self) -> dict:
        """The settings the model card lists (:mod:`lolrl.engine.model_card`)."""
        lora = self.lora
        return {"algorithm": "ppo", "cliprange": self.cliprange, "cliprange_value": self.cliprange_value,
                "init_kl_coef": self.init_kl_coef, "adap_kl_ctrl": self.adap_kl_ctrl, "kl_target": self.kl_target,
                "kl_penalty": self.kl_penalty, "vf_coef": self.vf_coef, "gamma": self.gamma, "lam": self.lam,
                "learning_rate": self.learning_rate, "optim": str(getattr(self.optim, "value", self.optim)),
                "lr_scheduler_type": str(getattr(self.lr_scheduler_type, "value", self.lr_scheduler_type)),
                "max_steps": self.max_steps, "rollouts per step (per process)": self.rollout_batch_size,
                "per_device_train_batch_size": self.per_device_train_batch_size,
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
        self.cache = cache_lib.Cache(config.cache_dir, enabled=config.stage_cache, accelerator=self.accelerator)
        self.tokenizer = load_tokenizer(config.model_name, config.tokenizer_name)
        # the decodings' stop texts (e.g. HH's ' ###') as token ids of this tokenizer
        self.rollout_settings = with_stop_texts(config.rollout, self.tokenizer)
        self.validation_settings = with_stop_texts(config.validation, self.tokenizer)
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
        if config.activation_checkpointing:
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
                                    (config.adam_beta1, config.adam_beta2), config.adam_epsilon, config.weight_decay)
        self.model, optimizer = prepare_for_training(self.accelerator, self.model, optimizer, config.max_grad_norm,
                                                     device_placement=[not self.quantized, True])
        steps = config.max_steps * config.ppo_epochs * (config.rollout_batch_size // config.backward_batch_size)
        return optimizer, get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                        num_training_steps=steps)

    # ---------------------------------------------------------------------------------- rollouts
    def _next_prompts(self) -> list[Record]:
        """This process's share of the next global batch; every process walks the same permutation."""
        acc, n = self.accelerator, len(self.train_records)
        chosen = []
        for _ in range(self.config.rollout_batch_size * acc.num_processes):
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
                          batch_size=self.config.per_device_eval_batch_size, show_progress=False,
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
        responses = generate_token_ids(self._policy(), self.tokenizer, prompts, self.rollout_settings,
                                       config.per_device_eval_batch_size, acc.device)
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
        for start in range(0, len(rows), config.per_device_train_batch_size):
            batch = self._collate(rows[start:start + config.per_device_train_batch_size])
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
                size = config.per_device_train_batch_size
                minis = [group[i:i + size] for i in range(0, len(group), size)]
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
                                            config.rollout_batch_size * acc.num_processes)
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
                                  self.validation_settings, self.config.per_device_eval_batch_size, self.accelerator,
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
                            scheduler, progress, self.best_state, self.config.save_total_limit)

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
        """Train for ``max_steps`` PPO steps with validation; returns the best validation summary.
        The output and save folders are locked for the run (a second run on them is refused)."""
        with hold_folders({"output folder": self.output_dir, "save folder": self.config.save_dir}, self.is_main):
            return self._run()

    def _run(self) -> dict:
        config, acc = self.config, self.accelerator
        if self.is_main:
            atomic_write_json(self.output_dir / "args.json", config.to_dict())
        self._load()
        optimizer, scheduler = self._optimizer()
        if report_to_list(config.report_to):
            acc.init_trackers("lolrl_ppo", config=flat_config(config.to_dict()))
        checkpoint = self.find_checkpoint()
        if checkpoint is not None:
            self._resume(checkpoint, optimizer, scheduler)
        else:
            if config.eval_on_start and self.val_records:
                self.validate(0, self._initial_generations())
            seed_stage(config.seed, "train")  # the rollouts' stream, whether the validation above was cached or not
        logger.info("PPO: %d steps of %d rollouts (x%d processes), %d epochs of mini-batches of %d, reference: %s",
                    config.max_steps, config.rollout_batch_size, acc.num_processes, config.ppo_epochs,
                    config.per_device_train_batch_size, "frozen copy" if self.ref_model is not None else
                    "starting adapter (frozen)" if self.ref_adapter else "adapter disabled")
        progress = tqdm(total=config.max_steps, initial=self.global_step, desc="ppo",
                        disable=not acc.is_local_main_process)
        started = time.time()
        while self.global_step < config.max_steps:
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
                self.global_step % config.eval_steps == 0 or self.global_step == config.max_steps)
            if validated:
                self.validate(self.global_step)
            stopping = self.global_step == config.stop_after_steps
            every = config.save_steps
            scheduled = not config.checkpoint_never and (
                (every == 0 and validated) or (every > 0 and self.global_step % every == 0))
            if stopping or scheduled:
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
