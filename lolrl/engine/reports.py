"""Metrics, result tables and plots for generated text.

Everything here is pure post-processing: it reads lists of completions / rewards or the
JSON Lines logs written during training and produces numbers, tables (JSON, CSV, Markdown)
and PNG figures. Every file is written atomically through :mod:`lolrl.utils.io`, so a run killed
mid-write never leaves a truncated table or image behind.
"""
from __future__ import annotations

import csv
import io as _stdio
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from lolrl.engine.meteor import corpus_meteor
from lolrl.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

FINAL_REWARD = "final_reward"
# Columns of a training log that are the x axis / bookkeeping, never plotted as a curve.
_NON_METRIC_KEYS = ("step", "epoch")
_PLOT_DPI = 120


# ----------------------------------------------------------------------------- text metrics
def _tokens(text: str) -> list[str]:
    """Lower-cased whitespace tokens (the simple tokenisation the A-LoL paper reports)."""
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams over all texts.

    n-grams never cross text boundaries. Returns 0.0 when there are no n-grams at all
    (empty input, or every text shorter than ``n`` tokens).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        toks = _tokens(text)
        for i in range(len(toks) - n + 1):
            seen.add(tuple(toks[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


def mean_length(texts: Sequence[str]) -> float:
    """Mean whitespace-token count; 0.0 for an empty list."""
    return sum(len(t.split()) for t in texts) / len(texts) if texts else 0.0


def extractive_fragment_lengths(knowledge: Sequence[str], response: Sequence[str],
                                original_off_by_one: bool = False) -> list[int]:
    """Lengths |f| of the greedy extractive fragments of ``response`` in ``knowledge`` (Grusky et al. 2018).

    From response position i, scan the knowledge for every run of equal tokens starting there and keep
    the longest (the first of equal length); i then moves past it (or by one when nothing matched). A
    run replaces the current best f when ``|run| > |f|``, as in Newsroom's own ``Fragments._match``.
    The paper's pseudo-code writes ``|f| < i' - i - 1``, i.e. ``|run| > |f| + 1``: single shared words
    never count and a run one longer than f never replaces it. The A-LoL code followed the pseudo-code;
    ``original_off_by_one=True`` reproduces it.
    """
    margin = 1 if original_off_by_one else 0
    lengths: list[int] = []
    i = 0
    while i < len(response):
        best = 0
        j = 0
        while j < len(knowledge):
            if response[i] != knowledge[j]:
                j += 1
                continue
            run = 0
            while i + run < len(response) and j + run < len(knowledge) and response[i + run] == knowledge[j + run]:
                run += 1
            if run > best + margin:
                best = run
            j += run
        if best:
            lengths.append(best)
        i += max(best, 1)
    return lengths


def coverage_and_density(knowledge: str, response: str, original_off_by_one: bool = False) -> tuple[float, float]:
    """Extractive coverage and density of a response w.r.t. its knowledge (whitespace tokens, case-sensitive).

    coverage = sum_f |f| / |response tokens|,  density = sum_f |f|^2 / |response tokens|,
    over the fragments of :func:`extractive_fragment_lengths`. A response with no tokens (empty or
    whitespace only) scores 0 for both (the original divided by zero on whitespace-only text).
    """
    response_tokens = response.split()
    if not response_tokens:
        return 0.0, 0.0
    lengths = extractive_fragment_lengths(knowledge.split(), response_tokens, original_off_by_one)
    n = len(response_tokens)
    return sum(lengths) / n, sum(f * f for f in lengths) / n


def knowledge_overlap_summary(knowledge: Sequence[str], responses: Sequence[str],
                              original_off_by_one: bool = False) -> dict[str, float]:
    """Mean and population std of coverage and density over aligned (knowledge, response) pairs:
    ``{"coverage", "coverage_std", "density", "density_std"}`` (NaN for no pairs)."""
    if len(knowledge) != len(responses):
        raise ValueError(f"{len(knowledge)} knowledge texts for {len(responses)} responses")
    pairs = [coverage_and_density(k, r, original_off_by_one) for k, r in zip(knowledge, responses)]
    coverage, coverage_std = _mean_std([c for c, _ in pairs])
    density, density_std = _mean_std([d for _, d in pairs])
    return {"coverage": coverage, "coverage_std": coverage_std, "density": density, "density_std": density_std}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std; NaN for an empty list (serialised as null, not a fake 0)."""
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


def summarize_generations(
    completions: Sequence[str],
    rewards: dict[str, Sequence[float]],
    golds: Sequence[str] | None = None,
    knowledge: Sequence[str] | None = None,
) -> dict[str, float]:
    """One row of evaluation numbers for a set of completions.

    Returns ``{<component>: mean, ..., "final_reward": mean, "final_reward_std": std,
    "distinct_1", "distinct_2", "distinct_3", "avg_response_len", "n"}`` with reward
    components in their given order, plus ``coverage, coverage_std, density, density_std``
    against ``knowledge`` (:func:`knowledge_overlap_summary`) and ``meteor`` against the gold
    ``golds`` (:func:`lolrl.engine.meteor.corpus_meteor`, over all of them) when those are given.
    Reward, gold and knowledge lists must align with ``completions``: a length mismatch
    almost always means they belong to other rows.
    """
    out: dict[str, float] = {}
    for name, values in rewards.items():
        values = [float(v) for v in values]
        if len(values) != len(completions):
            raise ValueError(
                f"reward {name!r} has {len(values)} values for {len(completions)} completions"
            )
        mean, std = _mean_std(values)
        out[name] = mean
        if name == FINAL_REWARD:
            out[f"{FINAL_REWARD}_std"] = std
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = distinct_n(completions, n)
    out["avg_response_len"] = mean_length(completions)
    if knowledge is not None:
        out.update(knowledge_overlap_summary(knowledge, completions))
    if golds is not None:
        out["meteor"] = corpus_meteor(completions, golds)
    out["n"] = len(completions)
    return out


# ----------------------------------------------------------------------------- tables
def _columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Union of metric names over all rows, in first-seen order."""
    cols: dict[str, None] = {}
    for metrics in rows.values():
        cols.update(dict.fromkeys(metrics))
    return list(cols)


def _format_cell(value: Any) -> str:
    """Markdown cell: ints as-is, floats with 4 decimals (4 significant digits if tiny/huge)."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    # ".4f" would print a 1e-5 learning rate as 0.0000; switch to ".4g" for such values.
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.4g}"
    return f"{value:.4f}"


def format_markdown_table(rows: dict[str, dict[str, Any]], first_column: str = "split") -> str:
    """GitHub Markdown table: one line per row key, columns = union of metrics, blanks for missing."""
    cols = _columns(rows)
    header = [first_column] + cols
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|",
    ]
    for name, metrics in rows.items():
        cells = [str(name)] + [_format_cell(metrics.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_cell(value: Any) -> str:
    """Full-precision CSV cell (repr of floats round-trips exactly); blank for missing/None."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def format_csv(rows: dict[str, dict[str, Any]], first_column: str = "split") -> str:
    """CSV text with one row per key, first column ``first_column``, blanks for missing metrics."""
    cols = _columns(rows)
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([first_column] + cols)
    for name, metrics in rows.items():
        writer.writerow([name] + [_csv_cell(metrics.get(c)) for c in cols])
    return buf.getvalue()


def write_results_table(
    output_dir: str | os.PathLike, stem: str, rows: dict[str, dict[str, Any]]
) -> dict[str, Path]:
    """Write ``{stem}.json``, ``{stem}.csv`` and ``{stem}.md`` under ``output_dir``.

    Returns ``{"json": path, "csv": path, "md": path}``.
    """
    output_dir = Path(output_dir)
    paths = {ext: output_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md")}
    atomic_write_json(paths["json"], rows)
    atomic_write_text(paths["csv"], format_csv(rows))
    atomic_write_text(paths["md"], format_markdown_table(rows))
    return paths


# ----------------------------------------------------------------------------- log reading
def _is_number(value: Any) -> bool:
    """Finite int/float, but not bool (True would otherwise plot as 1.0)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _read_log(path: str | os.PathLike) -> list[dict]:
    """JSON Lines rows, tolerating a missing file and a torn last line from a killed run."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def _series(rows: Iterable[dict], keys: Sequence[str] | None) -> dict[str, tuple[list, list]]:
    """{metric: (steps, values)} from log rows; rows without a numeric step are skipped."""
    series: dict[str, tuple[list, list]] = {}
    if keys is not None:
        series = {k: ([], []) for k in keys if k not in _NON_METRIC_KEYS}
    for row in rows:
        step = row.get("step")
        if not _is_number(step):
            continue
        for key, value in row.items():
            if key in _NON_METRIC_KEYS or not _is_number(value):
                continue
            if keys is None:
                series.setdefault(key, ([], []))
            if key in series:
                series[key][0].append(step)
                series[key][1].append(value)
    return {k: v for k, v in series.items() if v[0]}


# ----------------------------------------------------------------------------- plotting
def pyplot():
    """pyplot on the non-interactive Agg backend (training machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: str | os.PathLike) -> Path:
    """Render to memory, then write atomically, and always free the figure."""
    plt = pyplot()
    try:
        buf = _stdio.BytesIO()
        fig.savefig(buf, format="png", dpi=_PLOT_DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    out_png = Path(out_png)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png


def _grid(plt, n_panels: int, max_cols: int = 3, panel_size=(4.5, 3.2)):
    """Figure with ``n_panels`` axes in a grid; unused trailing axes are hidden."""
    ncols = min(max_cols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False
    )
    flat = list(axes.flat)
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def plot_loss_curves(
    train_log_path: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: list[str] | None = None,
) -> Path | None:
    """One subplot per numeric metric of a training log (x = step).

    ``keys`` restricts (and orders) the metrics; by default every numeric key except
    ``step``/``epoch`` is plotted. Returns None and writes nothing when the log is missing
    or holds no numeric rows.
    """
    series = _series(_read_log(train_log_path), keys)
    if not series:
        return None
    plt = pyplot()
    fig, axes = _grid(plt, len(series))
    for ax, (name, (steps, values)) in zip(axes, series.items()):
        ax.plot(steps, values, linewidth=1.0, marker="." if len(steps) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png)


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if _is_number(v)]


def _ordered_components(*dicts: dict[str, Any] | None) -> list[str]:
    """Union of reward names in first-seen order with final_reward moved last."""
    names: dict[str, None] = {}
    for d in dicts:
        if d:
            names.update(dict.fromkeys(d))
    ordered = [k for k in names if k != FINAL_REWARD]
    return ordered + ([FINAL_REWARD] if FINAL_REWARD in names else [])


def _draw_distribution(ax, values: list[float], position: float, color: str) -> None:
    """Violin when there are >= 2 values (a KDE needs spread), box otherwise; mean as a marker."""
    if len(values) >= 2 and max(values) > min(values):
        parts = ax.violinplot([values], positions=[position], widths=0.7, showextrema=True)
        for body in parts["bodies"]:
            body.set_facecolor(color)
            body.set_alpha(0.5)
    else:
        box = ax.boxplot([values], positions=[position], widths=0.4, patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.5)
    ax.scatter([position], [sum(values) / len(values)], color="black", marker="D", s=20, zorder=3)


def plot_reward_distributions(
    generated: dict[str, list[float]],
    gold: dict[str, list[float]] | None,
    out_png: str | os.PathLike,
    title: str = "",
) -> Path:
    """One panel per reward component: generated vs gold (dataset) distributions, means marked."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = pyplot()
    components = _ordered_components(generated, gold) or ["(no rewards)"]
    sides = [("generated", generated, "tab:blue"), ("gold", gold or {}, "tab:orange")]
    fig, axes = _grid(plt, len(components), max_cols=4, panel_size=(3.2, 3.2))
    for ax, name in zip(axes, components):
        labels = []
        for pos, (label, source, color) in enumerate(sides):
            values = _finite(source.get(name, []))
            if values:
                _draw_distribution(ax, values, pos, color)
            labels.append(label)
        ax.set_xticks(range(len(sides)))
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.6, len(sides) - 0.4)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=c, alpha=0.5, label=l) for l, _, c in sides]
    handles.append(Line2D([], [], color="black", marker="D", linestyle="", label="mean"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Below the panels (after tight_layout) so it never covers a panel title;
    # bbox_inches="tight" at save time grows the canvas to include it.
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(handles), fontsize="small", frameon=False)
    return save_figure(fig, out_png)


def plot_validation_curve(
    validation_log_path: str | os.PathLike,
    out_png: str | os.PathLike,
    metric: str = FINAL_REWARD,
    higher_is_better: bool = True,
) -> Path | None:
    """Line plot of ``metric`` vs step from validation_stats.jsonl with the best point marked.

    Returns None and writes nothing when the log is missing or has no numeric ``metric``.
    """
    series = _series(_read_log(validation_log_path), [metric])
    if metric not in series:
        return None
    steps, values = series[metric]
    pick = max if higher_is_better else min
    best = pick(range(len(values)), key=values.__getitem__)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(steps, values, marker="o", markersize=3, label=metric)
    ax.scatter(
        [steps[best]], [values[best]], color="red", s=60, zorder=3,
        label=f"best {values[best]:.4g} @ step {steps[best]}",
    )
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, out_png)
