"""Online RL on Helpful-and-Harmless: the command line and run of ``ppo_qlora_llama_hh.py`` (PPO on
:mod:`lolrl.online.ppo`; GRPO / RLOO through TRL), with the HH data, reward and validation."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from lolrl.engine.model_card import HubSettings
from lolrl.engine.optim import resolve as resolve_optimizer
from lolrl.engine.rewards import RewardSpecError
from lolrl.engine.runtime import end_trainer_run
from lolrl.tasks.hh.cli import PPOHHArguments, parse_hh
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.shared import (
    adapter_of,
    generation_settings,
    hh_postprocess,
    precision,
    read_hh_files,
    validation_records,
    validation_reward,
)
from lolrl.utils.errors import ConfigError, UserError, report_user_error


def ppo_config(args: PPOHHArguments):
    from lolrl.online.ppo import PPOConfig

    greedy = generation_settings(args.model_name)
    greedy.max_new_tokens = args.max_new_tokens
    sampling = dataclasses.replace(greedy, do_sample=True, top_p=args.top_p, temperature=args.temperature,
                                   top_k=args.top_k)
    return PPOConfig(
        model_name=args.model_name, adapter_path=adapter_of(args), output_dir=args.output_dir,
        save_dir=str(Path(args.output_dir) / "best_adapter"), cache_dir=args.cache_dir,
        lora=args.lora, **precision(args),
        total_steps=args.max_steps, learning_rate=args.learning_rate, batch_size=args.ppo_rollout_batch_size,
        mini_batch_size=args.per_device_train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        ppo_epochs=args.ppo_epochs, max_grad_norm=args.max_grad_norm or None, lr_scheduler=args.lr_scheduler_type,
        warmup_steps=args.warmup_steps, optim=args.optim, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_epsilon, weight_decay=args.weight_decay,
        init_kl_coef=args.kl_beta, adap_kl_ctrl=args.adap_kl_ctrl, kl_target=args.kl_target,
        kl_horizon=args.kl_horizon, kl_penalty=args.kl_penalty, cliprange=args.ppo_clip,
        cliprange_value=args.cliprange_value, vf_coef=args.vf_coef, gamma=args.gamma, lam=args.lam,
        use_score_scaling=args.use_score_scaling, use_score_norm=args.use_score_norm,
        early_stopping=args.early_stopping, target_kl=args.target_kl, max_prompt_length=args.max_prompt_length,
        rollout=sampling, validation=greedy, generation_batch_size=args.per_device_eval_batch_size,
        eval_steps=args.eval_steps, max_val_examples=args.max_val_examples, seed=args.seed,
        report_to=args.report_to, save_steps=args.save_steps, resume="never" if args.no_resume else "auto",
        stop_after_steps=args.stop_after_steps, gradient_checkpointing=args.activation_checkpointing,
        logprob_kernel=args.logprob_kernel, disable_dropout=args.disable_dropout, hub=HubSettings.of(args))


def run_trl(args: PPOHHArguments, train, val, reward) -> dict:
    """TRL's GRPO or RLOO on the same model, reward (on post-processed text) and validation callback.
    The output folder is locked for the run (a second run on it is refused)."""
    from lolrl.utils.lock import check_output_paths, hold_folders
    from lolrl.utils.processes import launched_as_main

    if args.logprob_kernel == "liger":
        raise ConfigError(f"--logprob_kernel liger is lolrl's PPO trainer's (--trainer ppo); TRL's {args.trainer} "
                          "keeps its own log-prob path")
    check_output_paths({"output folder": args.output_dir}, str(Path(args.output_dir) / "best_adapter"),
                       {"starting model": args.model_name, "adapter": adapter_of(args)})
    with hold_folders({"output folder": args.output_dir}, launched_as_main()):
        return _run_trl(args, train, val, reward)


def _run_trl(args: PPOHHArguments, train, val, reward) -> dict:
    import torch
    from datasets import Dataset

    from lolrl.engine.modeling import load_model, load_tokenizer
    from lolrl.engine.validation import RewardValidationCallback, reward_columns

    if args.trainer == "grpo":
        from trl import GRPOConfig as TRLConfig
        from trl import GRPOTrainer as TRLTrainer
    else:
        from trl import RLOOConfig as TRLConfig
        from trl import RLOOTrainer as TRLTrainer
    columns = reward_columns(train)
    dataset = Dataset.from_dict({"prompt": [r.prompt for r in train], **columns})
    clean = hh_postprocess(args)

    def hh_reward(prompts, completions, **kwargs):
        mine = {k: kwargs[k] for k in columns if k in kwargs}
        return reward(prompts=prompts, completions=[clean(c) for c in completions], show_progress=False,
                      **mine)["final_reward"]

    model = load_model(args.model_name, **precision(args), adapter_path=adapter_of(args),
                       lora=args.lora)
    tokenizer = load_tokenizer(args.model_name)
    greedy = generation_settings(args.model_name)
    greedy.max_new_tokens = args.max_new_tokens
    # TRL's rollouts end where lolrl's do, at EOS and at the next turn's '###' (TRL takes the model's eos ids)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *greedy.stop_token_ids]
    config = TRLConfig(
        output_dir=args.output_dir, learning_rate=args.learning_rate, max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k,
        beta=args.kl_beta, epsilon=args.ppo_clip, max_grad_norm=args.max_grad_norm, seed=args.seed,
        optim=resolve_optimizer(args.optim), adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_epsilon=args.adam_epsilon, weight_decay=args.weight_decay,
        logging_steps=1, save_strategy="no", report_to=args.report_to or "none", bf16=torch.cuda.is_available(),
        lr_scheduler_type=args.lr_scheduler_type, gradient_checkpointing=args.activation_checkpointing,
        disable_dropout=args.disable_dropout)
    trainer = TRLTrainer(model=model, reward_funcs=hh_reward, args=config, train_dataset=dataset,
                         processing_class=tokenizer)
    from lolrl.engine.collation import Tokenizer

    rows = Tokenizer(tokenizer, False, args.max_prompt_length, args.max_new_tokens)(val)
    RewardValidationCallback(val, rows, tokenizer, reward, greedy, args.per_device_eval_batch_size, args.eval_steps,
                             args.output_dir, Path(args.output_dir) / "best_adapter", postprocess=clean,
                             adapter_name="default").attach(trainer)
    trainer.train()
    end_trainer_run(trainer)
    best = Path(args.output_dir) / "best_adapter" / "best.json"
    return json.loads(best.read_text()) if best.exists() else {}


def main(argv=None, description: str | None = None) -> int:
    args = parse_hh(PPOHHArguments, argv, description or __doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(args)
        config = ppo_config(args)
        reward = validation_reward(  # --reward SPEC, else the OpenAssistant-style --reward_model
            args.reward, args.reward_model, args.per_device_eval_batch_size)
        if reward is None:
            raise RewardSpecError("online PPO scores its rollouts: --reward none is not possible here")
        train, val = pro_records(train_rows, args.prompt_format, "sft", "train"), validation_records(args, dev_rows)
        if args.trainer != "ppo":
            if args.push_to_hub:
                raise ConfigError(f"--push_to_hub is for --trainer ppo (lolrl's trainer); with --trainer "
                                  f"{args.trainer} upload OUTPUT/best_adapter yourself")
            val = val[: args.max_val_examples] if args.max_val_examples else val
            best = run_trl(args, train, val, reward)
        else:
            from lolrl.online.ppo import PPOTrainer

            best = PPOTrainer(config, train, val, reward, postprocess=hh_postprocess(args)).run()
    except UserError as exc:
        return report_user_error(exc)
    if best:
        print(f"best validation reward {best.get('measure', float('nan')):.4f} at step {best.get('step')}; "
              f"adapter in {config.save_dir}")
    return 0

