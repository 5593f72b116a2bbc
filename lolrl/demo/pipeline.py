"""The offline demo: the whole A-LoL pipeline on the embedded task, from a model trained from scratch.

data -> tokenizer + tiny Llama (from scratch) -> NLL reference -> pi_ref's generations on val,
rewards, value head -> training advantages (the share that is negative is the share A-LoL leaves
out) -> A-LoL and the baselines, per seed -> test evaluation -> ``results.csv`` and ``rewards.png``.

Every stage is the library's own (``OfflineRLTrainer``), the same as the command line runs.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lolrl.demo import task as demo_task
from lolrl.demo.smollm2 import materialise
from lolrl.demo.tiny import build_llama_lm, train_tokenizer
from lolrl.engine.config import OfflineRLConfig
from lolrl.engine.data import load_task_dir
from lolrl.engine.generation import GenerationSettings
from lolrl.engine.modeling import LoraSettings
from lolrl.engine.reports import format_markdown_table, pyplot, save_figure
from lolrl.engine.rewards import load_reward
from lolrl.engine.sampling import NoPositiveRowsError
from lolrl.utils.io import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineTask:
    """What the pipeline needs of a task: a writer of its data folder (``train/val/test.jsonl``), the
    reward spec and its components (each in [0, 1] here), and text to train a scratch tokenizer on."""

    name: str
    write: Callable[[Path, "DemoSettings"], Path]  # (folder, settings) -> the data folder
    reward_spec: str
    components: tuple[str, ...]
    max_reward: float
    corpus: Callable[[], Sequence[str]]


def _write_demo_task(directory: Path, settings: "DemoSettings") -> Path:
    return demo_task.write_task(directory, settings.n_train, settings.n_val, settings.n_test, settings.bad_share,
                                chat=settings.chat_prompts)


DEMO_TASK = PipelineTask("demo", _write_demo_task, demo_task.REWARD_SPEC, tuple(demo_task.COMPONENTS),
                         demo_task.MAX_REWARD, demo_task.corpus)
def parse_variant(name: str) -> tuple[str, dict]:
    """An algorithm name with its value-estimate variants: ``"a_lol+k4"`` -> ``("a_lol", {"value_samples": 4})``
    (V(x) fit to the mean reward of 4 samples per prompt), ``"a_lol+ridge"`` -> ``("a_lol", {"value_head":
    "ridge"})``, ``"a_lol+group"`` -> ``("a_lol", {"value_source": "group"})`` (the other responses to the
    prompt as the baseline), both: ``"a_lol+k4+ridge"``; a plain name -> ``(name, {})``."""
    algorithm, *parts = name.split("+")
    overrides: dict = {}
    for part in parts:
        if part == "ridge":
            overrides["value_head"] = "ridge"
        elif part == "group":
            overrides["value_source"] = "group"
        elif part[:1] == "k" and part[1:].isdigit() and int(part[1:]) >= 1:
            overrides["value_samples"] = int(part[1:])
        else:
            raise ValueError(f"{name}: unknown variant '+{part}' (known: +kK, e.g. +k4, +ridge and +group)")
    return algorithm, overrides


@dataclass
class DemoSettings:
    """Sizes and learning rates of one demo run; ``tiny()`` and ``smollm2()`` are the two presets."""

    model: str = "tiny"
    n_train: int = 2000
    n_val: int = 100
    n_test: int = 200
    bad_share: float = 0.5
    chat_prompts: bool = False
    nll_epochs: int = 8
    nll_learning_rate: float = 3e-3
    rl_epochs: int = 2
    rl_learning_rate: float = 1e-3
    batch_size: int = 32
    max_resp_length: int = 20
    max_prompt_length: int = 64
    max_steps: int = -1
    lora: LoraSettings = field(default_factory=LoraSettings)
    tiny_layers: int = 2
    tiny_width: int = 128
    evaluate_start: bool = False  # also evaluate the starting model itself (useful for a pretrained one)
    greedy: bool = False  # greedy decoding for validation and test (default: sampling)
    val_log_frequency: int = 2  # validations per epoch of each run
    validate_start: bool = True  # stage 2 validates pi_ref at step 0 too (it may then be the kept model)

    @classmethod
    def smollm2(cls) -> "DemoSettings":
        # 135M parameters on 2 CPU cores: fewer rows and steps, LoRA, a pretrained chat model.
        return cls(model="smollm2", n_train=256, n_val=24, n_test=48, chat_prompts=True, nll_epochs=1,
                   nll_learning_rate=1e-3, rl_epochs=1, rl_learning_rate=5e-4, batch_size=8, max_resp_length=24,
                   max_prompt_length=128, max_steps=24, lora=LoraSettings(r=8, alpha=16, dropout=0.0))


def build_base_model(output_dir: Path, settings: DemoSettings, task: PipelineTask = DEMO_TASK) -> Path:
    """The starting model: a tiny Llama and tokenizer trained from scratch, or SmolLM2 materialised."""
    if settings.model == "smollm2":
        return materialise(output_dir / "smollm2")
    directory = output_dir / "scratch_model"
    tokenizer = train_tokenizer(task.corpus(), directory, vocab_size=600, with_pad=False)
    build_llama_lm(tokenizer, directory, n_layer=settings.tiny_layers, hidden=settings.tiny_width, heads=4,
                   max_positions=128)
    return directory


def _config(settings: DemoSettings, task: PipelineTask, **overrides) -> OfflineRLConfig:
    base = dict(per_device_train_batch_size=settings.batch_size, per_device_eval_batch_size=64,
                max_resp_length=settings.max_resp_length,
                max_prompt_length=settings.max_prompt_length, max_steps=settings.max_steps,
                val_log_frequency=settings.val_log_frequency, lora=settings.lora,
                # Sampling, not beam search: the table then measures the policy's whole distribution
                # (NLL reproduces the data's share of poor responses), and V(x) fits E_pi_ref[R]. Greedy
                # (settings.greedy): one deterministic answer per prompt, for paired comparisons.
                generation=GenerationSettings(max_new_tokens=settings.max_resp_length, num_beams=1,
                                              repetition_penalty=1.0, do_sample=not settings.greedy),
                task_name=task.name, reward=task.reward_spec, logging_steps=10)
    base.update(overrides)
    return OfflineRLConfig(**base)


def _train(config: OfflineRLConfig, data, reward) -> dict:
    from lolrl.engine.trainer import OfflineRLTrainer

    return OfflineRLTrainer(args=config, data=data, reward=reward).run()


def run_demo(output_dir: str | Path, algorithms=("a_lol", "wbc"), seeds: Sequence[int] | dict = (0,),
             settings: DemoSettings | None = None, task: PipelineTask = DEMO_TASK) -> list[dict]:
    """Run the pipeline; returns one result row per (algorithm, seed) plus the NLL reference (and the
    starting model with ``settings.evaluate_start``). An algorithm ``NAME+kK`` is NAME with
    ``value_samples=K``; ``seeds`` is one list for all, or ``{algorithm: seeds}``."""
    settings = settings or DemoSettings()
    out = Path(output_dir)
    started = time.time()
    data_dir = task.write(out / "data", settings)
    data, reward = load_task_dir(data_dir), load_reward(task.reward_spec)
    if all("kind" in r.meta for r in data.train):
        share_bad = np.mean([r.meta["kind"] != "good" for r in data.train])
        print(f"[demo] task: {len(data.train)} train rows, {100 * share_bad:.0f}% poor responses -> {data_dir}")
    base = build_base_model(out, settings, task)
    rows = []
    if settings.evaluate_start:
        print("[demo] the starting model, untrained")
        start = _train(_config(settings, task, model_name=str(base), output_dir=str(out / "runs" / "start"),
                               algorithm="nll", do_train=False, lora=LoraSettings(r=0)), data, reward)
        rows.append(_result_row("start", 0, start, task))

    print("[demo] stage 1: NLL on all training rows -> the reference policy pi_ref")
    nll_dir = out / "runs" / "nll"
    nll_results = _train(_config(settings, task, model_name=str(base), output_dir=str(nll_dir), algorithm="nll",
                                 num_train_epochs=settings.nll_epochs, learning_rate=settings.nll_learning_rate,
                                 seed=0), data, reward)
    reference = nll_dir / "model"
    rows.append(_result_row("nll (reference)", 0, nll_results, task))

    for name in algorithms:
        algorithm, variant = parse_variant(name)
        for seed in seeds[name] if isinstance(seeds, dict) else seeds:
            print(f"[demo] stage 2: {name}, seed {seed}, from pi_ref")
            run_dir = out / "runs" / f"{name}_seed{seed}"
            try:
                results = _train(_config(settings, task, model_name=str(reference), output_dir=str(run_dir),
                                         algorithm=algorithm, num_train_epochs=settings.rl_epochs,
                                         learning_rate=settings.rl_learning_rate, seed=seed, **variant,
                                         cache_dir=str(out / "cache"), eval_on_start=settings.validate_start),
                                 data, reward)
            except NoPositiveRowsError as exc:  # a result too: A-LoL finds nothing to learn from here
                print(f"[demo]   refused: {exc}")
                rows.append({**_result_row(name, seed, {}, task), "refused": str(exc).splitlines()[0]})
                continue
            _print_advantages(run_dir)
            rows.append({**_result_row(name, seed, results, task), **_run_facts(run_dir)})
    write_results(out, rows, task)
    print(f"[demo] done in {time.time() - started:.0f} s: {out / 'results.csv'}, {out / 'rewards.png'}, "
          f"runs in {out / 'runs'}")
    return rows


def _print_advantages(run_dir: Path) -> None:
    path = run_dir / "advantage_stats.json"
    if path.exists():
        stats = json.loads(path.read_text())
        print(f"[demo]   advantages: {100 * stats['share_negative']:.0f}% of training rows negative "
              f"(left out), {100 * (1 - stats['share_non_positive']):.0f}% positive (the leftover lunch)")


def _result_row(algorithm: str, seed: int, results: dict, task: PipelineTask = DEMO_TASK) -> dict:
    test = results.get("test/generated", {})
    row = {"algorithm": algorithm, "seed": seed, "final_reward": test.get("final_reward")}
    row.update({name: test.get(name) for name in task.components})
    row.update({k: test.get(k) for k in ("distinct_1", "distinct_2", "avg_response_len")})
    return row


def _run_facts(run_dir: Path) -> dict:
    """The step of the kept (best-validated) model (0: the starting one won); V(x)'s cross-validated R^2
    and rank correlation, and the share of training rows it leaves out."""
    best = run_dir / "model" / "best.json"
    facts = {"best_step": json.loads(best.read_text())["step"]} if best.exists() else {}
    fit = run_dir / "value_fit.json"
    if not fit.exists():
        return facts
    report = json.loads(fit.read_text())
    stats = json.loads((run_dir / "advantage_stats.json").read_text())
    return {**facts, "value_r2": report["cv_r2"], "value_spearman": report["cv_spearman"],
            "share_negative": stats["share_negative"]}


def summarise(rows: list[dict], task: PipelineTask = DEMO_TASK) -> dict[str, dict[str, float]]:
    """Mean and std over seeds per algorithm, in first-seen order (V(x)'s R^2 too, where fit)."""
    table: dict[str, dict[str, float]] = {}
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        group = [r for r in rows if r["algorithm"] == algorithm]
        entry: dict[str, float] = {"seeds": len(group)}
        extra = ["value_r2"] if all(r.get("value_r2") is not None for r in group) else []
        for key in ["final_reward", *task.components, *extra]:
            values = np.array([r[key] for r in group], dtype=float)
            entry[key] = float(values.mean())
            entry[f"{key}_std"] = float(values.std())
        table[algorithm] = entry
    return table


def write_results(out: Path, rows: list[dict], task: PipelineTask = DEMO_TASK) -> None:
    """``results.csv`` (every run, a refused one with its reason) and the summary table and plot of the runs
    that trained."""
    atomic_write_text(out / "results.csv", _rows_csv(rows))
    for row in rows:
        if row.get("refused"):
            print(f"[demo] {row['algorithm']} seed {row['seed']}: refused ({row['refused']})")
    summary = summarise([r for r in rows if not r.get("refused")], task)
    print(format_markdown_table(summary, first_column="algorithm"))
    plot_rewards(summary, out / "rewards.png", task)


def _rows_csv(rows: list[dict]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    fields = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_rewards(summary: dict[str, dict[str, float]], path: Path, task: PipelineTask = DEMO_TASK) -> None:
    """Stacked mean reward components per algorithm, with the std of final_reward over seeds."""
    plt = pyplot()

    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4))
    bottom = np.zeros(len(names))
    for component in task.components:
        values = np.array([summary[n][component] for n in names])
        ax.bar(names, values, bottom=bottom, label=component)
        bottom += values
    ax.errorbar(names, bottom, yerr=[summary[n]["final_reward_std"] for n in names], fmt="none", color="black",
                capsize=4)
    ax.axhline(task.max_reward, color="grey", linestyle="--", linewidth=1, label="maximum")
    ax.set_ylabel("mean test reward")
    ax.set_title("Test reward per algorithm (stacked components, error bar = std over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    save_figure(fig, path)
