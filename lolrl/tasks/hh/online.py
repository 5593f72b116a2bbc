"""Online RL on Helpful-and-Harmless: the command line and run of ``ppo_qlora_llama_hh.py`` (PPO on
:mod:`lolrl.online.ppo`; GRPO / RLOO through TRL), with the HH data, reward and validation. The command
line parses straight into :class:`lolrl.tasks.hh.cli.PPOHHConfig`, a :class:`lolrl.online.ppo.PPOConfig`."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from transformers import TrainingArguments

from lolrl.engine.rewards import RewardSpecError
from lolrl.engine.runtime import end_trainer_run
from lolrl.online.ppo import PPOConfig
from lolrl.tasks.hh.cli import HHTraining, PPOHHConfig, PPOHHData, parse_hh
from lolrl.tasks.hh.data import pro_records
from lolrl.tasks.hh.shared import hh_postprocess, read_hh_files, validation_records, validation_reward
from lolrl.utils.errors import ConfigError, UserError, report_user_error

PPO_HELP = """Online PPO on Helpful-and-Harmless with a (Q)LoRA LLaMA: the paper's RLHF baseline.

    lolrl hh ppo --output_dir checkpoints/ppo_qlora_llama --cache_dir cache/ppo --total_steps 6000

Each PPO step samples responses (top-p 0.95, 128 new tokens, stop at '###' and EOS) for
``--ppo_rollout_batch_size`` training prompts, scores the post-processed text with the 1.4B
OpenAssistant reward model (or ``--reward SPEC``), penalises the per-token KL to the frozen
starting adapter (adaptive coefficient, 0.2 toward a target of 6), estimates advantages with
GAE and a value head on the policy's last hidden states, and runs ``--ppo_epochs`` epochs of the
clipped surrogate and clipped value losses over mini-batches of ``--per_device_train_batch_size``
(``--gradient_accumulation_steps`` per optimizer step). The defaults are the original's settings
(its PPOConfig and TRL 0.7.1's defaults). Every ``--eval_steps`` steps: greedy generation on the
dev prompts, scored by the reward model; the best adapter and its value head go to
``OUTPUT/best_adapter``. 4-bit NF4 base on CUDA; plain LoRA in fp32 without CUDA (it says so).
``--stop_after_steps N`` stops, checkpointed, and the same command resumes.

``--trainer grpo`` / ``--trainer rloo`` run TRL's GRPO / RLOO trainers instead (further online
baselines, group-relative advantages over ``--num_generations`` samples per prompt, no value head)
with the same model loading, reward, KL coefficient (``--kl_beta``; TRL adds a frozen copy of the
starting adapter as the reference), clip range (``--ppo_clip``) and validation / best adapter.
"""

# The TrainingArguments settings PPOConfig (and the HH scripts' training settings) restate: TRL's GRPO / RLOO configs
# (TrainingArguments too) take them as they are (the learning rate, batch sizes, optimizer, schedule, clip, seed, ...).
_DECLARED = {*PPOConfig.__annotations__, *HHTraining.__annotations__}
_TRAINING_ARGUMENTS = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def trl_config(config: PPOConfig, trainer: str, num_generations: int):
    """TRL's ``GRPOConfig`` / ``RLOOConfig`` from the same config: every TrainingArguments field it restates, by
    name, plus what TRL calls otherwise (the rollout decoding, beta = the initial KL coefficient, epsilon = the clip
    range); saving and validation are lolrl's (the validation callback)."""
    if trainer == "grpo":
        from trl import GRPOConfig as TRLConfig
    else:
        from trl import RLOOConfig as TRLConfig
    rollout = config.rollout
    own = dict(num_generations=num_generations, max_completion_length=rollout.max_new_tokens,
               temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k, beta=config.init_kl_coef,
               epsilon=config.cliprange, bf16=config.bf16, gradient_checkpointing=config.activation_checkpointing,
               disable_dropout=config.disable_dropout, use_cpu=config.use_cpu, save_strategy="no",
               eval_on_start=False, eval_steps=None, report_to=config.report_to or "none")
    ignored = {f.name for f in dataclasses.fields(config) if f.metadata.get("ignored")}
    shared = (_TRAINING_ARGUMENTS & _DECLARED) - ignored - set(own)
    return TRLConfig(**{name: getattr(config, name) for name in sorted(shared)}, **own)


def run_trl(config: PPOHHConfig, train, val, reward, postprocess) -> dict:
    """TRL's GRPO or RLOO on the same model, reward (on post-processed text) and validation callback.
    The output folder is locked for the run (a second run on it is refused)."""
    from lolrl.utils.lock import check_output_paths, hold_folders
    from lolrl.utils.processes import launched_as_main

    if config.logprob_kernel == "liger":
        raise ConfigError(f"--logprob_kernel liger is lolrl's PPO trainer's (--trainer ppo); TRL's {config.trainer} "
                          "keeps its own log-prob path")
    check_output_paths({"output folder": config.output_dir}, config.save_dir,
                       {"starting model": config.model_name, "adapter": config.adapter_path})
    with hold_folders({"output folder": config.output_dir}, launched_as_main()):
        return _run_trl(config, train, val, reward, postprocess)


def _run_trl(config: PPOHHConfig, train, val, reward, postprocess) -> dict:
    from datasets import Dataset

    from lolrl.engine.collation import Tokenizer
    from lolrl.engine.generation import with_stop_texts
    from lolrl.engine.modeling import base_load_dtype, load_model, load_tokenizer
    from lolrl.engine.validation import RewardValidationCallback, reward_columns

    if config.trainer == "grpo":
        from trl import GRPOTrainer as TRLTrainer
    else:
        from trl import RLOOTrainer as TRLTrainer
    columns = reward_columns(train)
    dataset = Dataset.from_dict({"prompt": [r.prompt for r in train], **columns})

    def hh_reward(prompts, completions, **kwargs):
        mine = {k: kwargs[k] for k in columns if k in kwargs}
        return reward(prompts=prompts, completions=[postprocess(c) for c in completions], show_progress=False,
                      **mine)["final_reward"]

    model = load_model(config.model_name, adapter_path=config.adapter_path, lora=config.lora,
                       dtype=base_load_dtype(config.dtype, config.lora, config.adapter_path, config.load_in_4bit),
                       load_in_4bit=config.load_in_4bit, quantization=config.quantization)
    tokenizer = load_tokenizer(config.model_name, config.tokenizer_name)
    greedy = with_stop_texts(config.validation, tokenizer)
    # TRL's rollouts end where lolrl's do, at EOS and at the next turn's '###' (TRL takes the model's eos ids)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id,
                                            *with_stop_texts(config.rollout, tokenizer).stop_token_ids]
    trainer = TRLTrainer(model=model, reward_funcs=hh_reward, args=trl_config(config, config.trainer,
                                                                             config.num_generations),
                         train_dataset=dataset, processing_class=tokenizer)
    rows = Tokenizer(tokenizer, False, config.max_prompt_length, greedy.max_new_tokens)(val)
    RewardValidationCallback(val, rows, tokenizer, reward, greedy, config.per_device_eval_batch_size,
                             config.eval_steps, config.output_dir, config.save_dir, postprocess=postprocess,
                             adapter_name="default").attach(trainer)
    trainer.train()
    end_trainer_run(trainer)
    best = Path(config.save_dir) / "best.json"
    return json.loads(best.read_text()) if best.exists() else {}


def main(argv: list[str] | None = None) -> int:
    """``lolrl hh ppo`` (``ppo_qlora_llama_hh.py``): parse straight into (PPOHHData, PPOHHConfig) and train."""
    data, config = parse_hh((PPOHHData, PPOHHConfig), argv, PPO_HELP)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        train_rows, dev_rows = read_hh_files(data)
        reward = validation_reward(  # --reward SPEC, else the OpenAssistant-style --reward_model
            config.reward, data.reward_model, config.per_device_eval_batch_size)
        if reward is None:
            raise RewardSpecError("online PPO scores its rollouts: --reward none is not possible here")
        train, val = pro_records(train_rows, data.prompt_format, "sft", "train"), validation_records(data, dev_rows)
        if config.trainer != "ppo":
            if config.push_to_hub:
                raise ConfigError(f"--push_to_hub is for --trainer ppo (lolrl's trainer); with --trainer "
                                  f"{config.trainer} upload OUTPUT/best_adapter yourself")
            val = val[: config.max_val_examples] if config.max_val_examples else val
            best = run_trl(config, train, val, reward, hh_postprocess(data))
        else:
            from lolrl.online.ppo import PPOTrainer

            best = PPOTrainer(config, train, val, reward, postprocess=hh_postprocess(data)).run()
    except UserError as exc:
        return report_user_error(exc)
    if best:
        print(f"best validation reward {best.get('measure', float('nan')):.4f} at step {best.get('step')}; "
              f"adapter in {config.save_dir}")
    return 0
