"""A toy task for the tests: prompts, responses of two qualities, and a reward that tells them apart."""
from __future__ import annotations

import json
import random
from pathlib import Path

GOOD = {"thanks", "please", "glad", "help", "sure", "happy", "welcome", "kind"}
TOPICS = ["cats", "rain", "music", "trains", "bread", "stars", "rivers", "chess"]
GOOD_RESPONSES = ["sure i am glad to help with {t}", "thanks for asking about {t} happy to help",
                  "please enjoy {t} you are welcome", "glad you like {t} kind regards"]
BAD_RESPONSES = ["no {t} is dull go away", "whatever {t} bad", "stop asking about {t} now", "{t} {t} {t} no"]


def politeness(prompts, completions, **columns):
    """Share of words in the completion that are polite (in [0, 1])."""
    scores = []
    for text in completions:
        words = text.lower().split()
        scores.append(sum(w in GOOD for w in words) / len(words) if words else 0.0)
    return scores


def brevity(prompts, completions, **columns):
    """1 for short answers, falling to 0 at 20 words."""
    return [max(0.0, 1.0 - len(text.split()) / 20) for text in completions]


def make_rows(n: int, seed: int, bad_share: float = 0.5, chat: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        template = rng.choice(BAD_RESPONSES if rng.random() < bad_share else GOOD_RESPONSES)
        response = template.format(t=topic)
        prompt = f"user: tell me about {topic}\nbot:"
        polite = politeness(None, [response])[0]
        brief = brevity(None, [response])[0]
        rows.append({"id": f"r{seed}-{i}", "prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                     "response": response,
                     "reward_components": {"politeness": polite, "brevity": brief, "final_reward": polite + brief}})
    return rows


def write_task(directory: Path, n_train: int = 48, n_val: int = 12, n_test: int = 8) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
        with open(directory / f"{split}.jsonl", "w") as handle:
            for row in make_rows(n, seed):
                handle.write(json.dumps(row) + "\n")
    return directory


def corpus() -> list[str]:
    texts = [f"user: tell me about {t}\nbot:" for t in TOPICS]
    texts += [r.format(t=t) for r in GOOD_RESPONSES + BAD_RESPONSES for t in TOPICS]
    return texts * 3
