"""Tests for lolrl.engine.reports: metrics by hand, tables round-trip, plots are real PNGs."""
from __future__ import annotations

import csv
import json
import math

import pytest

from lolrl.engine.reports import (
    distinct_n,
    format_markdown_table,
    mean_length,
    plot_loss_curves,
    plot_reward_distributions,
    plot_validation_curve,
    summarize_generations,
    write_results_table,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_bytes=2000):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > min_bytes
    # Atomic writes leave no temporary files behind.
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- distinct / length
def test_distinct_n_hand_computed():
    texts = ["a b a b", "a c"]
    # unigrams a b a b a c -> 3 unique / 6
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    # bigrams (a b)(b a)(a b) + (a c); no (b a) across the boundary -> 3 unique / 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams (a b a)(b a b); "a c" is too short -> 2 / 2
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(texts, 4) == pytest.approx(1 / 1)


def test_distinct_n_does_not_cross_text_boundaries():
    # Joined, "x y" + "x y" would give bigram (y x); per-text there are just two (x y).
    assert distinct_n(["x y", "x y"], 2) == pytest.approx(1 / 2)


def test_distinct_n_case_folding():
    assert distinct_n(["The the THE"], 1) == pytest.approx(1 / 3)
    assert distinct_n(["A b", "a B"], 2) == pytest.approx(1 / 2)


@pytest.mark.parametrize("texts", [[], [""], ["   "], ["word"], ["one", "two"]])
def test_distinct_n_degenerate_inputs_are_zero(texts):
    assert distinct_n(texts, 2) == 0.0
    assert distinct_n(texts, 3) == 0.0


def test_distinct_n_rejects_bad_n():
    with pytest.raises(ValueError):
        distinct_n(["a b"], 0)


def test_mean_length():
    assert mean_length([]) == 0.0
    assert mean_length(["a b c", "", "  d   e "]) == pytest.approx(5 / 3)


# ----------------------------------------------------------------------------- summary
def test_summarize_generations_values_and_order():
    completions = ["a b a b", "a c"]
    rewards = {"fluency": [1.0, 0.0], "safety": [0.5, 0.5], "final_reward": [2.0, 4.0]}
    summary = summarize_generations(completions, rewards)
    assert list(summary)[:4] == ["fluency", "safety", "final_reward", "final_reward_std"]
    assert summary["fluency"] == pytest.approx(0.5)
    assert summary["safety"] == pytest.approx(0.5)
    assert summary["final_reward"] == pytest.approx(3.0)
    assert summary["final_reward_std"] == pytest.approx(1.0)  # population std, not 1.414
    assert summary["distinct_1"] == pytest.approx(0.5)
    assert summary["distinct_2"] == pytest.approx(0.75)
    assert summary["distinct_3"] == pytest.approx(1.0)
    assert summary["avg_response_len"] == pytest.approx(3.0)
    assert summary["n"] == 2


def test_summarize_generations_without_final_reward_has_no_std():
    summary = summarize_generations(["x"], {"r": [0.25]})
    assert summary["r"] == pytest.approx(0.25)
    assert "final_reward" not in summary and "final_reward_std" not in summary
    assert summary["n"] == 1


def test_summarize_generations_length_mismatch_raises():
    with pytest.raises(ValueError):
        summarize_generations(["a", "b"], {"final_reward": [1.0]})


def test_summarize_generations_empty_is_nan_not_error():
    summary = summarize_generations([], {"final_reward": []})
    assert math.isnan(summary["final_reward"])
    assert summary["n"] == 0 and summary["distinct_1"] == 0.0


# ----------------------------------------------------------------------------- tables
ROWS = {
    "val/generated": {"final_reward": 0.123456789, "distinct_1": 0.5, "n": 10},
    "val/gold": {"final_reward": -1.5, "n": 12},
    "test/generated": {"distinct_1": 0.25, "lr": 1e-5, "n": 3},
}


def test_write_results_table_files_and_json_roundtrip(tmp_path):
    paths = write_results_table(tmp_path / "out", "results", ROWS)
    assert set(paths) == {"json", "csv", "md"}
    for key, path in paths.items():
        assert path.is_file() and path.name == f"results.{key}"
    assert json.loads(paths["json"].read_text()) == ROWS


def test_write_results_table_csv_union_of_columns(tmp_path):
    paths = write_results_table(tmp_path, "results", ROWS)
    with open(paths["csv"], newline="") as handle:
        parsed = list(csv.DictReader(handle))
    with open(paths["csv"], newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["split", "final_reward", "distinct_1", "n", "lr"]
    assert [r["split"] for r in parsed] == list(ROWS)
    for row in parsed:
        expected = ROWS[row["split"]]
        for col in header[1:]:
            if col in expected:
                assert float(row[col]) == expected[col]  # exact: full precision written
            else:
                assert row[col] == ""


def test_markdown_table_shape_and_formatting(tmp_path):
    paths = write_results_table(tmp_path, "results", ROWS)
    lines = paths["md"].read_text().strip().splitlines()
    assert len(lines) == 2 + len(ROWS)
    assert lines[0] == "| split | final_reward | distinct_1 | n | lr |"
    assert set(lines[1]) <= set("|-: ") and lines[1].count("|") == 6
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["val/generated", "0.1235", "0.5000", "10", ""]
    # A tiny float keeps its significant digits instead of collapsing to 0.0000.
    assert "1e-05" in lines[4]
    assert all(line.count("|") == 6 for line in lines)


def test_format_markdown_table_custom_first_column():
    text = format_markdown_table({"run1": {"a": 1.0}}, first_column="model")
    assert text.splitlines()[0] == "| model | a |"
    assert text.splitlines()[2] == "| run1 | 1.0000 |"


# ----------------------------------------------------------------------------- plots
def test_plot_loss_curves_writes_png(tmp_path):
    log = tmp_path / "train_log.jsonl"
    rows = [
        {"step": i, "epoch": 0, "loss": 1.0 / (i + 1), "advantage": 0.1 * i,
         "importance_weight": 1.0, "lr": 1e-5, "nll": 2.0 - 0.01 * i}
        for i in range(20)
    ]
    _write_jsonl(log, rows)
    out = plot_loss_curves(log, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png"
    _assert_png(out)


def test_plot_loss_curves_missing_or_empty_log_returns_none(tmp_path):
    out = tmp_path / "loss.png"
    assert plot_loss_curves(tmp_path / "nope.jsonl", out) is None
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert plot_loss_curves(empty, out) is None
    # Only step/epoch and non-numeric values: nothing to plot.
    junk = tmp_path / "junk.jsonl"
    _write_jsonl(junk, [{"step": 1, "epoch": 0, "note": "hi", "flag": True}])
    assert plot_loss_curves(junk, out) is None
    assert not out.exists()


def test_plot_loss_curves_skips_non_numeric_and_torn_lines(tmp_path):
    import lolrl.engine.reports as ev

    log = tmp_path / "train_log.jsonl"
    log.write_text(
        json.dumps({"step": 1, "loss": 1.0, "phase": "warmup"}) + "\n"
        + json.dumps({"step": 2, "loss": "nan-string", "nll": 3.0}) + "\n"
        + json.dumps({"step": "x", "loss": 9.0}) + "\n"
        + json.dumps({"step": 3, "loss": 0.5, "nll": None}) + "\n"
        + '{"step": 4, "loss": 0.'  # torn last line from a killed run
    )
    series = ev._series(ev._read_log(log), None)
    assert series == {"loss": ([1, 3], [1.0, 0.5]), "nll": ([2], [3.0])}
    _assert_png(plot_loss_curves(log, tmp_path / "loss.png"))
    # keys restricts the plotted metrics; unknown keys are dropped, not an error.
    assert ev._series(ev._read_log(log), ["nll", "missing"]) == {"nll": ([2], [3.0])}
    assert plot_loss_curves(log, tmp_path / "none.png", keys=["missing"]) is None


def test_plot_reward_distributions(tmp_path):
    generated = {"final_reward": [0.1, 0.5, 0.9, 0.4], "fluency": [0.2, 0.3, 0.8, 0.1],
                 "single": [0.7]}
    reference = {"fluency": [0.5, 0.6, 0.4], "final_reward": [0.3, 0.2, 0.6],
                 "ref_only": [1.0, 2.0]}
    out = plot_reward_distributions(generated, reference, tmp_path / "rewards.png", "val")
    _assert_png(out)
    out2 = plot_reward_distributions(generated, None, tmp_path / "gen_only.png")
    _assert_png(out2)


def test_reward_component_order_final_last():
    from lolrl.engine.reports import _ordered_components

    assert _ordered_components({"final_reward": [], "a": []}, {"b": [], "a": []}) == [
        "a", "b", "final_reward"]


def test_plot_validation_curve(tmp_path):
    log = tmp_path / "validation_stats.jsonl"
    _write_jsonl(log, [{"step": s, "epoch": 0, "final_reward": r, "other": 1}
                       for s, r in [(10, 0.3), (20, 0.5), (30, 0.4)]])
    _assert_png(plot_validation_curve(log, tmp_path / "val.png"))
    assert plot_validation_curve(log, tmp_path / "x.png", metric="missing") is None
    assert plot_validation_curve(tmp_path / "nope.jsonl", tmp_path / "y.png") is None
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
