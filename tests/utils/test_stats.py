"""The paired bootstrap interval over test prompts and seeds (lolrl.utils.stats), and the aggregation's
table of means, stds over seeds and intervals against a baseline run."""
import csv
import json

import numpy as np
import pytest

from lolrl.utils.stats import mean_and_std, paired_bootstrap


def test_tiny_case_by_hand():
    # one seed, two prompts with differences 1 and 3: the resampled means are 1, 2 or 3 (p = 1/4, 1/2, 1/4),
    # so the 2.5% and 97.5% percentiles are 1 and 3; the mean is 2
    result = paired_bootstrap({"a": 1.0, "b": 3.0})
    assert (result.mean, result.low, result.high, result.prompts, result.pairs) == (2.0, 1.0, 3.0, 2, 2)
    # every pair equal: a zero-width interval at that value
    same = paired_bootstrap([{"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}])
    assert (same.mean, same.low, same.high, same.prompts, same.pairs) == (0.5, 0.5, 0.5, 2, 4)
    # seeds pooled, prompts resampled as clusters: prompt a's two seeds (0 and 2) travel together, so every
    # resample's mean is 1 (a alone), 2 (both) or 3 (b's two pairs alone)
    clustered = paired_bootstrap([{"a": 0.0, "b": 3.0}, {"a": 2.0, "b": 3.0}])
    assert clustered.mean == 2.0 and (clustered.low, clustered.high) == (1.0, 3.0)
    assert paired_bootstrap({"a": 1.0, "b": 3.0}) == result  # seeded: the same pairs, the same interval
    assert mean_and_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_and_std([4.0]) == (4.0, None)


def _scores(shift: float, seeds: int = 2, prompts: int = 200, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    difficulty = rng.normal(0, 1, prompts)  # shared by both runs: what pairing removes
    base, other = [], []
    for _ in range(seeds):
        base.append({f"p{i}": d + rng.normal(0, 1) for i, d in enumerate(difficulty)})
        other.append({f"p{i}": d + shift + rng.normal(0, 1) for i, d in enumerate(difficulty)})
    return base, other


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_known_shift_is_inside_and_zero_outside(rng_seed):
    base, other = _scores(0.5, rng_seed=rng_seed)
    result = paired_bootstrap([{k: o[k] - b[k] for k in b} for b, o in zip(base, other)])
    assert result.low < 0.5 < result.high and result.excludes_zero() and result.pairs == 400
    assert result.high - result.low < 0.5  # 400 pairs of noise sd sqrt(2): a narrow interval
    base, other = _scores(0.0, rng_seed=rng_seed)
    null = paired_bootstrap([{k: o[k] - b[k] for k in b} for b, o in zip(base, other)])
    assert null.low < 0 < null.high and not null.excludes_zero()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no paired differences"):
        paired_bootstrap([{}])
    with pytest.raises(ValueError, match="prompt 'x'"):
        paired_bootstrap({"x": float("nan")})


def _write_run(folder, seed, scores, metric="final_reward"):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"seed": seed}))
    mean = float(np.mean(list(scores.values())))
    (folder / "eval_results.json").write_text(json.dumps({"test/generated": {metric: mean, "n": len(scores)}}))
    (folder / "test_generations.jsonl").write_text(
        "".join(json.dumps({"id": k, "response": "r", metric: v}) + "\n" for k, v in scores.items()))
    return mean


def test_aggregation_prints_means_stds_and_intervals(tmp_path, capsys):
    """Generated results: a_lol = nll + 0.5 + noise on 200 test prompts, 2 seeds (seed 1 as a _seed1 folder),
    wbc = nll + noise; the reference nll run has one seed and pairs with every seed."""
    from lolrl.tasks.paper.aggregate import main

    rng = np.random.default_rng(3)
    difficulty = {f"p{i}": rng.normal() for i in range(200)}
    task = tmp_path / "results" / "reddit_pos"
    nll = {k: d + rng.normal(0, 0.5) for k, d in difficulty.items()}
    _write_run(task / "ref", 901, nll)
    means = {"a_lol": [], "wbc": []}
    for name, shift in (("a_lol", 0.5), ("wbc", 0.0)):
        for seed, folder in ((0, f"ref_{name}"), (1, f"ref_{name}_seed1")):
            scores = {k: v + shift + rng.normal(0, 0.5) for k, v in nll.items()}
            means[name].append(_write_run(task / folder, seed, scores))
    out = tmp_path / "table.csv"
    assert main(["-bmps", "{'ref': False}", "-tn", "reddit_pos", "-o", str(out), "--results_dir",
                 str(tmp_path / "results"), "--baseline", "nll"]) == 0
    printed = capsys.readouterr().out
    assert "| task_name | baseline_model | algorithm | seeds | test_final_reward mean" in printed
    rows = {r["algorithm"]: r for r in csv.DictReader((tmp_path / "table_intervals.csv").open())}
    assert set(rows) == {"nll", "a_lol", "wbc"}  # r_gold and r_lol: missing, no row
    a_lol, wbc = rows["a_lol"], rows["wbc"]
    assert a_lol["seeds"] == "2" and a_lol["pairs"] == "400"
    assert float(a_lol["test_final_reward mean"]) == pytest.approx(np.mean(means["a_lol"]), abs=5e-4)
    assert float(a_lol["test_final_reward std"]) == pytest.approx(np.std(means["a_lol"], ddof=1), abs=5e-4)
    assert float(a_lol["ci95 low"]) < 0.5 < float(a_lol["ci95 high"]) and float(a_lol["ci95 low"]) > 0
    assert float(wbc["ci95 low"]) < 0 < float(wbc["ci95 high"])
    assert rows["nll"]["diff vs nll"] == "-" and rows["nll"]["test_final_reward std"] == "NA"
    # the main table keeps one row per run folder, as before
    main_rows = list(csv.DictReader(out.open()))
    assert {r["algorithm"] for r in main_rows} >= {"nll", "a_lol", "a_lol_seed1", "wbc", "wbc_seed1"}
