"""Reward functions that break the contract, for the error tests."""


def wrong_length(prompts, completions, **columns):
    return [1.0] * (len(completions) + 1)


def not_finite(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def constant_one(prompts, completions, **columns):
    return [1.0] * len(completions)


def raises(prompts, completions, **columns):
    raise KeyError("score")
