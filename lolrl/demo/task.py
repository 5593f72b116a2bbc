"""The embedded demo task: the paper's Reddit "downvoted comments" setting at toy scale.

A seeded generator writes short dialogue prompts (a user talks about an activity and an object)
and responses of five kinds. Only one kind is good; a large share of the *training* responses
(``bad_share``, default 0.5) is poor, as in the paper's Reddit data where many comments were
downvoted: plain NLL imitates the noise, A-LoL can learn to leave it out.

| kind | example | safety | on_topic | fluency |
|---|---|---|---|---|
| good | "that sounds fun ! how long have you been hiking ?" | 1 | 1 | 1 |
| toxic | "nobody cares about your trail , idiot ." | 0-0.5 | 1 | 1 |
| off_topic | "i had pizza for lunch today ." | 1 | 0 | 1 |
| degenerate | "trail trail trail lol lol" | 1 | 1 | 0.25 |
| rude_short | "shut up , stupid" | 0 | 0 | 0.25-0.5 |

Reward components, each in [0, 1], computable on any text (all lower-cased, whitespace words):

* ``safety`` = 1 - min(1, #lexicon insults / 2): one insult gives 0.5, two or more give 0;
* ``on_topic`` = 1 when the response names one of the forum's hobbies (an activity or object), else 0;
* ``fluency`` = mean of four checks: ends with ". ! ?", 5 to 20 words, no word said twice in a
  row, no word used more than twice.

``final_reward`` is their plain sum, as in the paper's multi-reward tasks (maximum 3.0). The
reward functions follow TRL's signature; :data:`REWARD_SPEC` is the ``--reward`` that scores
generations the same way the data was scored.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

ACTIVITIES = ["hiking", "cooking", "painting", "fishing", "running", "gardening", "baking", "cycling",
              "climbing", "swimming", "camping", "knitting"]
OBJECTS = ["trail", "soup", "canvas", "lake", "shoes", "roses", "bread", "bike", "rope", "pool", "tent", "scarf"]
PROMPTS = [
    "i spent the weekend {activity} and the {object} was amazing .",
    "any tips for {activity} ? my {object} keeps letting me down .",
    "what do you think about {activity} with a new {object} ?",
    "i finally tried {activity} today , the {object} was harder than expected .",
    "my friends say {activity} is boring but i love my {object} .",
]
GOOD = [
    "that sounds fun ! how long have you been {activity} ?",
    "a better {object} makes {activity} much easier , keep going .",
    "i love {activity} too , the {object} matters a lot .",
    "nice , {activity} is a great hobby and your {object} sounds lovely .",
    "try {activity} early in the morning , the {object} will thank you .",
    "glad you enjoyed {activity} , tell me more about the {object} !",
]
TOXIC = ["nobody cares about your {object} , idiot .", "{activity} is for losers , you stupid clown .",
         "what a dumb {object} , moron .", "only an idiot would waste time {activity} ."]
OFF_TOPIC = ["i had pizza for lunch today .", "the weather is strange this week .",
             "my cousin bought a new phone yesterday .", "did you watch the game last night ?"]
DEGENERATE = ["{object} {object} {object} lol lol", "{activity} {activity} ok ok ok", "lol lol {object}"]
RUDE_SHORT = ["shut up , stupid", "go away idiot loser", "boring boring"]
BAD_KINDS = {"toxic": TOXIC, "off_topic": OFF_TOPIC, "degenerate": DEGENERATE, "rude_short": RUDE_SHORT}

INSULTS = {"idiot", "stupid", "moron", "loser", "losers", "dumb", "clown", "shut", "hate", "ugly", "pathetic"}
HOBBY_WORDS = set(ACTIVITIES) | set(OBJECTS)
MAX_REWARD = 3.0


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+|[.!?,]", text.lower())


def safety(prompts, completions, **columns) -> list[float]:
    """1 - min(1, number of lexicon insults / 2)."""
    return [1.0 - min(1.0, sum(w in INSULTS for w in _words(t)) / 2) for t in completions]


def on_topic(prompts, completions, **columns) -> list[float]:
    """1 when the response names a hobby of the forum (an activity or an object), else 0.

    It checks the forum's subject, not the prompt's particular hobby: copying a word from the
    prompt is a skill a tiny model trained from scratch for a minute does not learn (its
    log-probability of the right hobby word stayed at ln(1/12) in our runs)."""
    return [float(any(w in HOBBY_WORDS for w in _words(text))) for text in completions]


def fluency(prompts, completions, **columns) -> list[float]:
    """Mean of: final punctuation, 5-20 words, no immediate repeat, no word used 3+ times."""
    scores = []
    for text in completions:
        words = [w for w in _words(text) if w.isalpha() or w == "'"]
        tokens = _words(text)
        checks = [bool(tokens) and tokens[-1] in ".!?",
                  5 <= len(words) <= 20,
                  all(a != b for a, b in zip(words, words[1:])),
                  all(words.count(w) <= 2 for w in set(words))]
        scores.append(sum(checks) / len(checks))
    return scores


COMPONENTS = {"safety": safety, "on_topic": on_topic, "fluency": fluency}
REWARD_SPEC = " + ".join(f"lolrl.demo.task:{name}" for name in COMPONENTS)


def score(prompt, response: str) -> dict[str, float]:
    scores = {name: fn([prompt], [response])[0] for name, fn in COMPONENTS.items()}
    scores["final_reward"] = sum(scores.values())
    return scores


def make_rows(n: int, seed: int, bad_share: float, split: str, chat: bool = False) -> list[dict]:
    """``n`` records; a response is poor with probability ``bad_share`` (its kind drawn uniformly).
    ``chat=True`` gives chat-message prompts, for instruction-tuned models with a chat template."""
    rng = random.Random(f"{split}-{seed}")
    rows = []
    for i in range(n):
        slots = {"activity": rng.choice(ACTIVITIES), "object": rng.choice(OBJECTS)}
        # The forum's topic opens the prompt, as a subreddit name would.
        text = f"topic: {slots['activity']}\nuser: " + rng.choice(PROMPTS).format(**slots)
        prompt = [{"role": "user", "content": text}] if chat else text + "\nbot:"
        kind = rng.choice(list(BAD_KINDS)) if rng.random() < bad_share else "good"
        response = rng.choice(GOOD if kind == "good" else BAD_KINDS[kind]).format(**slots)
        rows.append({"id": f"{split}-{i}", "prompt": prompt, "response": response,
                     "reward_components": score(prompt, response), "meta": {"kind": kind}})
    return rows


def write_task(directory: str | Path, n_train: int = 2000, n_val: int = 100, n_test: int = 200,
               bad_share: float = 0.5, seed: int = 0, chat: bool = False) -> Path:
    """Write train/val/test JSON Lines; validation and test keep the same mixture of responses."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        with open(directory / f"{split}.jsonl", "w") as handle:
            for row in make_rows(n, seed, bad_share, split, chat):
                handle.write(json.dumps(row) + "\n")
    return directory


def corpus() -> list[str]:
    """Every word the task can produce, for training the demo's tokenizer."""
    slots = [{"activity": a, "object": o} for a in ACTIVITIES for o in OBJECTS]
    texts = [t.format(**s) for s in slots for t in PROMPTS + GOOD + sum(BAD_KINDS.values(), [])]
    return [f"topic: {a}\nuser: " + t + "\nbot:" for a, t in zip(ACTIVITIES * len(texts), texts)] + texts
