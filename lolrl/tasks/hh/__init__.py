"""Helpful and Harmless: PRO-format data, OpenAssistant reward models, A-LoL / PRO / DPO / PPO glue, evaluation."""
