"""Online RL: PPO on Accelerate (GRPO and RLOO run through TRL from the HH PPO script)."""
