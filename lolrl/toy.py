"""A toy task that runs offline in seconds: short requests answered politely or rudely.

Half of the training responses are rude, and the reward (politeness + relevance + length_ok,
each in [0, 1])
tells them apart, so an offline RL method has something to learn that plain NLL imitates badly.
``python -m lolrl.toy --output_dir runs/toy`` builds the data, a tiny tokenizer and model trained
from scratch, then trains the NLL reference and A-LoL on it with the real command line.
The rewards follow TRL's signature and are usable as ``--reward lolrl.toy:politeness``; the full reward is :data:`REWARD_SPEC`.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

GOOD = {"thanks", "please", "glad", "help", "sure", "happy", "welcome", "kind"}
TOPICS = ["cats", "rain", "music", "trains", "bread", "stars", "rivers", "chess"]
GOOD_RESPONSES = ["sure i am glad to help with {t}", "thanks for asking about {t} happy to help",
                  "please enjoy {t} you are welcome", "glad you like {t} kind regards"]
BAD_RESPONSES = ["no {t} is dull go away", "whatever {t} bad", "stop asking about {t} now", "{t} {t} {t} no"]


def _words(text: str) -> list[str]:
    return text.lower().replace("\n", " ").replace(":", " ").split()


def politeness(prompts, completions, **columns):
    """1 with two or more polite words, 0.5 with one, 0 with none."""
    return [min(1.0, sum(w in GOOD for w in _words(text)) / 2) for text in completions]


def relevance(prompts, completions, **columns):
    """1 when the completion names the topic the prompt asks about, else 0."""
    scores = []
    for prompt, text in zip(prompts, completions):
        prompt_text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        topics = [t for t in TOPICS if t in _words(prompt_text)]
        scores.append(float(any(t in _words(text) for t in topics)))
    return scores


def length_ok(prompts, completions, **columns):
    """1 for 5 to 12 words, rising linearly from 0 below and falling to 0 at 24 words."""
    scores = []
    for text in completions:
        n = len(_words(text))
        scores.append(min(n / 5, 1.0) if n <= 12 else max(0.0, 1.0 - (n - 12) / 12))
    return scores


COMPONENTS = {"politeness": politeness, "relevance": relevance, "length_ok": length_ok}


def make_rows(n: int, seed: int, bad_share: float = 0.5, chat: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        template = rng.choice(BAD_RESPONSES if rng.random() < bad_share else GOOD_RESPONSES)
        response = template.format(t=topic)
        prompt = f"user: tell me about {topic}\nbot:"
        scores = {name: fn([prompt], [response])[0] for name, fn in COMPONENTS.items()}
        scores["final_reward"] = sum(scores.values())
        rows.append({"id": f"r{seed}-{i}", "prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                     "response": response, "reward_components": scores})
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


REWARD_SPEC = " + ".join(f"lolrl.toy:{name}" for name in COMPONENTS)


def build(output_dir: Path) -> tuple[Path, Path]:
    """Write the task files and a tiny GPT-2 with its own tokenizer; returns (data_dir, model_dir)."""
    from .tiny import build_causal_lm, train_tokenizer

    data_dir = write_task(output_dir / "data", n_train=256, n_val=32, n_test=32)
    model_dir = output_dir / "scratch_model"
    tokenizer = train_tokenizer(corpus(), model_dir, with_pad=False)
    build_causal_lm(tokenizer, model_dir, n_layer=2, n_embd=64, n_head=2)
    return data_dir, model_dir


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .cli import main as train

    parser = argparse.ArgumentParser(description="Build the toy task and run NLL, then A-LoL, on it (offline).")
    parser.add_argument("--output_dir", default="runs/toy")
    parser.add_argument("--algorithm", default="a_lol", help="the offline RL algorithm run after NLL")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    data_dir, model_dir = build(out)
    common = ["-i", str(data_dir), "-tn", "toy", "--reward", REWARD_SPEC, "-t", "-bs", "16", "-v_bs", "32",
              "-ml", "16", "--num_beams", "1", "--repetition_penalty", "1.0"]
    steps = [["-m", str(model_dir), "-algo", "nll", "-e", "6", "-lr", "3e-3", "-s", str(out / "nll"),
              "-o", str(out / "outputs_nll")],
             ["-m", str(out / "nll"), "-algo", args.algorithm, "-e", "3", "-lr", "1e-3", "-ev_b",
              "-s", str(out / args.algorithm), "-o", str(out / f"outputs_{args.algorithm}")]]
    for step in steps:
        code = train(common + step)
        if code:
            return code
    print(f"toy run done: compare {out}/outputs_nll/eval_results.md with {out}/outputs_{args.algorithm}/eval_results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
