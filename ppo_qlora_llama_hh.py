#!/usr/bin/env python
"""Online PPO on Helpful-and-Harmless with a (Q)LoRA LLaMA: the paper's RLHF baseline.

    python ppo_qlora_llama_hh.py --output_dir checkpoints/ppo_qlora_llama --cache_dir cache/ppo --total_steps 6000

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
import sys

from lolrl.tasks.hh.online import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
