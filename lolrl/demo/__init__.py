"""The embedded demo: a generated noisy task, tiny models built from configs, SmolLM2 from its wheel."""
