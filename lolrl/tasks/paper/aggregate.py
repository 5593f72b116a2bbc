"""Collect every run of a task into one CSV (the paper's columns) and a markdown table beside it.

Layout read (the commands in docs/reddit.md, dialogue.md and comet.md write it):
``RESULTS/<task>/<prefix>/[train_log/]`` is the reference run (``-algo nll``) and
``RESULTS/<task>/<prefix>_<algorithm>/[train_log/]`` each offline RL run started from it. ``-bmps``
maps each prefix to a bool: ``True`` expects every algorithm, ``False`` only the reward-based ones
(wbc, r_gold, r_lol). Other ``<prefix>_*`` folders found there get a row too. A run with no
``eval_results.json`` is reported as ``partial``, an expected run with no folder as ``missing``; both
keep their row (status column) and are listed on stderr.

Columns: ``task_name, baseline_model, algorithm, status``, then from ``validation_stats.jsonl``
``best e, best s, best V <metric>, worst e, worst s, worst V <metric>``, then ``val_<metric>,
test_<metric>`` and, for each of ``val_gen, test_gen, val_gold, test_gold``, one column per
metric of ``eval_results.json`` (reward components, final_reward, distinct-n, length, coverage/density
for the dialogue tasks, meteor). Numbers have 3 decimals; absent values are ``NA``. ``<metric>`` is the
paper task's checkpoint-selection metric; for any other task it is ``meteor``, the original's default
(read from ``validation_stats.jsonl`` and from ``eval_results.json``'s ``val/generated`` / ``test/generated``
rows, where the original read the top-level ``meteor`` of its final-eval file); ``--metric`` picks another.

Beside it, ``OUTPUT_intervals.csv`` / ``.md`` (printed too): per algorithm the mean and sample std over
seeds of ``test_<metric>`` and, against the ``--baseline`` run (default ``nll``, the prefix's reference
run), the mean paired difference with its bootstrap 95% interval over test prompts and seeds
(:func:`lolrl.utils.stats.paired_bootstrap`): the runs are paired by test prompt id
(``test_generations.jsonl``) within a seed. Seeds: a folder ``<prefix>_<algorithm>_seed<N>`` is seed N
of ``<algorithm>``; any other run's seed is its ``args.json``'s ``seed``. A baseline with a single run
(the reference) is paired with every seed of the others. A metric not scored per prompt (METEOR) gets
its mean and std, no interval.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lolrl.engine.losses import ADVANTAGE_ALGORITHMS, ALGORITHMS
from lolrl.tasks.paper.tasks import is_paper_task, task_info
from lolrl.utils.cli import DataclassParser, setting
from lolrl.utils.errors import UserError, report_user_error
from lolrl.utils.io import atomic_write_text
from lolrl.utils.stats import mean_and_std, paired_bootstrap

SEGMENTS = (("val_gen", "val/generated"), ("test_gen", "test/generated"), ("val_gold", "val/gold"),
            ("test_gold", "test/gold"))
SKIPPED_METRICS = ("n",)
DEFAULT_METRIC = "meteor"  # the original's success metric for tasks without a reward metric of their own


def success_metric(task_name: str, metric: str | None = None) -> str:
    """``metric`` if given, else the paper task's checkpoint-selection metric, else ``meteor``."""
    if metric:
        return metric
    return task_info(task_name).val_metric if is_paper_task(task_name) else DEFAULT_METRIC


class AggregateError(UserError):
    """Bad arguments (one line)."""


def parse_prefixes(text: str) -> dict[str, bool]:
    """``-bmps``: JSON or a Python literal (never executed): a dict prefix -> bool, or a list of prefixes.
    Its nesting and length are bounded before parsing, and every prefix must name a folder inside the
    results folder (a relative path without '..', at most MAX_PREFIX_DEPTH levels)."""
    if len(text) > MAX_PREFIXES_TEXT or _nesting(text) > 2:
        raise AggregateError(f"-bmps: expected a flat dict or list of prefixes (at most {MAX_PREFIXES_TEXT} "
                             "characters, no nested brackets)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise AggregateError(f"-bmps {text!r} is neither JSON nor a Python literal "
                                 "(expected e.g. \"{'dgpt_nll': True}\")") from None
    if isinstance(value, (list, tuple)):
        value = {v: True for v in value}
    if not isinstance(value, dict) or not value or not all(isinstance(k, str) and isinstance(v, bool)
                                                            for k, v in value.items()):
        raise AggregateError(f"-bmps {text!r}: expected a non-empty dict of prefix -> True/False")
    for prefix in value:
        parts = Path(prefix).parts
        if not prefix or Path(prefix).is_absolute() or ".." in parts or len(parts) > MAX_PREFIX_DEPTH:
            raise AggregateError(f"-bmps prefix {prefix!r}: expected a folder name inside the results folder "
                                 f"(relative, no '..', at most {MAX_PREFIX_DEPTH} levels)")
    return value


MAX_PREFIXES_TEXT = 10_000
MAX_PREFIX_DEPTH = 2


def _nesting(text: str) -> int:
    """The deepest bracket nesting of ``text`` (quoted strings included: a bound, not a parser)."""
    depth = deepest = 0
    for char in text:
        if char in "[{(":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]})":
            depth -= 1
    return deepest


@dataclass
class Run:
    baseline: str
    algorithm: str
    path: Path
    status: str = "missing"
    log_dir: Path | None = None
    validations: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)


def task_folder(root: Path, task_name: str) -> Path:
    """``RESULTS/<task>`` as typed, else the canonical name, else a folder matching case-insensitively."""
    canonical = task_info(task_name).name
    for candidate in (root / task_name, root / canonical):
        if candidate.is_dir():
            return candidate
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and child.name.lower() == canonical.lower():
                return child
    return root / task_name


def expected_runs(folder: Path, prefixes: dict[str, bool]) -> list[Run]:
    runs = []
    for prefix, with_advantage in prefixes.items():
        runs.append(Run(prefix, "nll", folder / prefix))
        algorithms = [a for a in ALGORITHMS if a != "nll" and (with_advantage or a not in ADVANTAGE_ALGORITHMS)]
        runs += [Run(prefix, a, folder / f"{prefix}_{a}") for a in algorithms]
        known = {r.path.name for r in runs}
        if folder.is_dir():
            runs += [Run(prefix, child.name[len(prefix) + 1:], child) for child in sorted(folder.iterdir())
                     if child.is_dir() and child.name.startswith(prefix + "_") and child.name not in known]
    return runs


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            if isinstance(row, dict):
                rows.append(row)
    return rows


def load_run(run: Run) -> Run:
    for candidate in (run.path / "train_log", run.path):
        if (candidate / "eval_results.json").is_file() or (candidate / "validation_stats.jsonl").is_file():
            run.log_dir = candidate
            break
    if run.log_dir is None:
        run.status = "missing" if not run.path.exists() else "partial: no validation_stats.jsonl or eval_results.json"
        return run
    run.validations = _read_jsonl(run.log_dir / "validation_stats.jsonl")
    results = run.log_dir / "eval_results.json"
    if results.is_file():
        try:
            run.results = json.loads(results.read_text(encoding="utf-8"))
            run.status = "complete"
        except json.JSONDecodeError:
            run.status = "partial: unreadable eval_results.json"
    else:
        run.status = f"partial: {len(run.validations)} validations, no eval_results.json"
    if run.status == "complete" and "test/generated" not in run.results:
        run.status = "partial: no test evaluation"
    return run


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "NA"
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    return str(value)


def table(runs: list[Run], task: str, metric: str) -> tuple[list[str], list[list[str]]]:
    keys: list[str] = []
    for run in runs:
        for _, segment in SEGMENTS:
            keys += [k for k in run.results.get(segment, {}) if k not in keys and k not in SKIPPED_METRICS]
    header = ["task_name", "baseline_model", "algorithm", "status", "best e", "best s", f"best V {metric}",
              "worst e", "worst s", f"worst V {metric}", f"val_{metric}", f"test_{metric}"]
    header += [f"{name} {key}" for name, _ in SEGMENTS for key in keys]
    rows = []
    for run in runs:
        scored = [v for v in run.validations if isinstance(v.get(metric), (int, float))]
        best = max(scored, key=lambda v: v[metric]) if scored else {}
        worst = min(scored, key=lambda v: v[metric]) if scored else {}
        row = [task, run.baseline, run.algorithm, run.status,
               _fmt(best.get("epoch")), _fmt(best.get("step")), _fmt(best.get(metric)),
               _fmt(worst.get("epoch")), _fmt(worst.get("step")), _fmt(worst.get(metric)),
               _fmt(run.results.get("val/generated", {}).get(metric)),
               _fmt(run.results.get("test/generated", {}).get(metric))]
        row += [_fmt(run.results.get(segment, {}).get(key)) for _, segment in SEGMENTS for key in keys]
        rows.append(row)
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


SEED_SUFFIX = re.compile(r"^(?P<algorithm>.+)_seed(?P<seed>\d+)$")


def algorithm_and_seed(run: Run) -> tuple[str, int]:
    """``(algorithm, seed)`` of a run: ``a_lol_seed2`` is seed 2 of ``a_lol``; otherwise its ``args.json``'s seed."""
    match = SEED_SUFFIX.match(run.algorithm)
    if match:
        return match["algorithm"], int(match["seed"])
    try:
        seed = json.loads((run.log_dir / "args.json").read_text(encoding="utf-8")).get("seed", 0)
    except (OSError, TypeError, json.JSONDecodeError):
        seed = 0
    return run.algorithm, int(seed) if isinstance(seed, int) else 0


def per_prompt_scores(run: Run, metric: str) -> dict[str, float] | None:
    """Test prompt id -> the run's ``metric`` on it (``test_generations.jsonl``); None when not every row has it."""
    rows = _read_jsonl(run.log_dir / "test_generations.jsonl")
    if not rows or not all(isinstance(r.get(metric), (int, float)) and "id" in r for r in rows):
        return None
    return {str(r["id"]): float(r[metric]) for r in rows}


def interval_table(runs: list[Run], task: str, metric: str, baseline: str) -> tuple[list[str], list[list[str]]]:
    """Per (prefix, algorithm): seeds, mean and std over seeds of ``test_<metric>``, and the paired bootstrap
    interval of the difference from ``baseline`` over test prompts and seeds."""
    groups: dict[tuple[str, str], dict[int, Run]] = {}
    for run in runs:
        if run.status == "complete":
            algorithm, seed = algorithm_and_seed(run)
            seeds = groups.setdefault((run.baseline, algorithm), {})
            if seed in seeds:
                print(f"note: {run.path} and {seeds[seed].path} are both seed {seed} of {run.baseline} / {algorithm}: "
                      "the intervals keep the first", file=sys.stderr)
                continue
            seeds[seed] = run
    header = ["task_name", "baseline_model", "algorithm", "seeds", f"test_{metric} mean", f"test_{metric} std",
              f"diff vs {baseline}", "ci95 low", "ci95 high", "pairs"]
    rows = []
    for (prefix, algorithm), seeds in groups.items():
        values = [r.results["test/generated"].get(metric) for r in seeds.values()]
        values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        mean, std = mean_and_std(values) if values else (None, None)
        row = [task, prefix, algorithm, str(len(seeds)), _fmt(mean), _fmt(std)]
        base = groups.get((prefix, baseline), {})
        pairs = []
        if algorithm != baseline and base:
            for seed, run in sorted(seeds.items()):
                other = base.get(seed) or (next(iter(base.values())) if len(base) == 1 else None)
                mine, theirs = per_prompt_scores(run, metric), other and per_prompt_scores(other, metric)
                if mine is not None and theirs:
                    pairs.append({i: mine[i] - theirs[i] for i in mine.keys() & theirs.keys()})
        pairs = [p for p in pairs if p]
        if pairs:
            diff = paired_bootstrap(pairs)
            row += [f"{diff.mean:+.3f}", f"{diff.low:+.3f}", f"{diff.high:+.3f}", str(diff.pairs)]
        else:
            row += ["-" if algorithm == baseline else "NA"] * 3 + ["0"]
        rows.append(row)
    return header, rows


def _write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    md_file = path.with_suffix(".md")
    atomic_write_text(md_file, markdown(header, rows))
    return md_file


def aggregate(prefixes: dict[str, bool], task_name: str, output_file: str | Path, results_dir: str | Path,
              metric: str | None = None, baseline: str = "nll") -> tuple[list[Run], Path, Path]:
    task = task_info(task_name)
    metric = success_metric(task_name, metric)
    folder = task_folder(Path(results_dir), task_name)
    runs = [load_run(r) for r in expected_runs(folder, prefixes)]
    output_file = Path(output_file)
    md_file = _write_table(output_file, *table(runs, task.name, metric))
    _write_table(intervals_file(output_file), *interval_table(runs, task.name, metric, baseline))
    return runs, output_file, md_file


def intervals_file(output_file: Path) -> Path:
    """``OUTPUT_intervals.csv`` beside ``OUTPUT.csv``."""
    return output_file.with_name(f"{output_file.stem}_intervals{output_file.suffix or '.csv'}")


@dataclass
class AggregateArguments:
    """Collect the runs of a task into a CSV (and a markdown table beside it)."""

    baseline_model_prefixes: str = setting(help="JSON or Python dict: run-folder prefix -> include the A-LoL "
                                                "(advantage) algorithms, e.g. \"{'dgpt_nll': True}\"",
                                           aliases=["-bmps"])
    task_name: str = setting(help="reddit_pos, reddit_neg, wow, faithdial, faithdial_wow, COMET", aliases=["-tn"])
    output_file: str = setting(help="CSV to write; the markdown table goes to the same name .md", aliases=["-o"])
    results_dir: str = setting("final_results", "folder holding <task>/<prefix>[_<algorithm>]/ runs")
    metric: str | None = setting(None, "success metric of the best/worst and val_/test_ columns (default: the paper "
                                       "task's checkpoint-selection metric; meteor for other tasks, as the original)")
    baseline: str = setting("nll", "the algorithm every other is compared with in OUTPUT_intervals.csv: mean "
                                   "paired difference of test_<metric> and its bootstrap 95 percent interval over test "
                                   "prompts and seeds (nll: the prefix's reference run)")


def build_parser() -> DataclassParser:
    return DataclassParser(AggregateArguments, description=AggregateArguments.__doc__)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_one(argv)
    try:
        prefixes = parse_prefixes(args.baseline_model_prefixes)
    except UserError as exc:
        return report_user_error(exc)
    metric = success_metric(args.task_name, args.metric)
    if not is_paper_task(args.task_name) and not args.metric:
        print(f"note: '{args.task_name}' is not a paper task: success metric {metric} (--metric picks another)",
              file=sys.stderr)
    runs, csv_path, md_path = aggregate(prefixes, args.task_name, args.output_file, args.results_dir, metric,
                                        args.baseline)
    print(intervals_file(csv_path).with_suffix(".md").read_text(encoding="utf-8"))
    for run in runs:
        if run.status != "complete":
            print(f"{run.status.split(':')[0]}: {run.baseline} / {run.algorithm} ({run.path}"
                  f"{'' if run.status == 'missing' else ': ' + run.status.split(': ', 1)[-1]})", file=sys.stderr)
    complete = sum(r.status == "complete" for r in runs)
    print(f"{complete} of {len(runs)} runs complete; wrote {csv_path}, {md_path} and "
          f"{intervals_file(csv_path)} (+ .md)")
    return 0 if complete else 1
