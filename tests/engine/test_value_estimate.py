"""V(x) worth its name: R^2 and rank correlation on hand numbers, --value_samples K, and one V(x)
whichever path computes a prompt's states."""
import logging

import numpy as np
import pytest
import torch

from lolrl.engine.config import OfflineRLConfig
from lolrl.engine.data import load_task_dir
from lolrl.engine.reference import prompt_states, reference_pass
from lolrl.engine.rewards import RewardFunction
from lolrl.engine.trainer import OfflineRLTrainer
from lolrl.engine.value import (
    INFORMATIVE_R2,
    RIDGE_ALPHAS,
    ValueFitReport,
    ValueFitSettings,
    fit_value_head,
    predict,
    r_squared,
    spearman,
)
from lolrl.utils.errors import ConfigError


def test_r_squared_by_hand():
    # errors 0, 0, 1 against the constant 2: 1 + 0 + 4 -> 1 - 1/5
    assert r_squared([1, 2, 3], [1, 2, 4], constant=2.0) == pytest.approx(0.8)
    assert r_squared([2, 2, 2], [1, 2, 4], constant=2.0) == pytest.approx(0.0)
    assert r_squared([4, 2, 1], [1, 2, 4], constant=2.0) < 0  # worse than the constant
    assert np.isnan(r_squared([1, 2], [3, 3], constant=3.0))


def test_spearman_by_hand_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # average ranks a = [0, 1.5, 1.5, 3], b = [0, 2, 1, 3]: 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 30), rng.normal(size=30)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)


def test_report_says_whether_v_beats_a_constant():
    def report(r2):
        return ValueFitReport(best_epoch=1, cv_mse=0.1, constant_mse=0.1, cv_r2=r2, cv_spearman=0.0, folds=5,
                              n_fit=10, insample_r2=0.5, target_mean=0.0, target_std=1.0)

    assert report(0.5).informative and not report(INFORMATIVE_R2 / 2).informative
    assert not report(float("nan")).informative and report(0.5).as_dict()["informative"] is True
    torch.manual_seed(0)
    states = [torch.randn(4, 8) for _ in range(40)]
    noise = np.random.default_rng(1).normal(size=40).tolist()  # unrelated to the states
    _, fit = fit_value_head(states, noise, ValueFitSettings(epochs=3))
    assert not fit.informative and {"cv_r2", "cv_spearman"} <= set(fit.as_dict())


def _trainer(tmp_path, model, data_dir, reward, **settings):
    config = OfflineRLConfig(model_name=model, output_dir=str(tmp_path / "run"), algorithm="a_lol",
                             max_resp_length=6, per_device_eval_batch_size=8, **settings)
    trainer = OfflineRLTrainer(args=config, data=load_task_dir(data_dir), reward=reward)
    return trainer


def test_value_samples_fit_the_mean_reward_of_k_samples(tmp_path, tiny_models, toy_dir):
    calls = []

    def n_words(prompts, completions, **_):
        calls.append((list(prompts), list(completions)))
        return [float(len(c.split())) for c in completions]

    reward = RewardFunction.from_callables({"n_words": n_words})
    trainer = _trainer(tmp_path, tiny_models["causal"], toy_dir, reward, value_samples=3, seed=4)
    assert trainer.value_sampling_settings().do_sample and trainer.value_sampling_settings().temperature == 1.0
    val = trainer._val_records()
    targets = trainer.value_targets(trainer.row_tokenizer(val))
    prompts = [p for call in calls for p in call[0]]  # the reward sees the rows in batches
    completions = [c for call in calls for c in call[1]]
    n = len(val)
    assert len(completions) == 3 * n and prompts == [r.prompt for r in val] * 3
    per_prompt = np.array([len(c.split()) for c in completions], dtype=float).reshape(3, n)
    assert targets == pytest.approx(per_prompt.mean(axis=0).tolist())
    assert len({tuple(per_prompt[:, i]) for i in range(n)}) > 1  # sampled, not one output repeated
    n_calls = len(calls)
    again = trainer.value_targets(trainer.row_tokenizer(val))  # from the cache, no new reward calls
    assert again == targets and len(calls) == n_calls


def test_value_samples_settings_are_checked(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="value_samples must be >= 1"):
        OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path), algorithm="a_lol", value_samples=0)
    with pytest.raises(ConfigError, match="not with --value_source data"):
        OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path), algorithm="a_lol",
                        value_samples=2, value_source="data")


@pytest.mark.parametrize("model", ["causal", "seq2seq", "llama"])
def test_v_of_a_prompt_is_the_same_whichever_path_computes_it(tmp_path, tiny_models, toy_dir, toy_reward_spec, model):
    """The head is fit on prompt_states() of validation rows and applied to training rows inside the
    reference pass (prompt + response in one forward, length-grouped batches, other padding): a prompt
    must get the same V(x) both ways, or the advantages carry an offset."""
    from lolrl.engine.rewards import load_reward

    trainer = _trainer(tmp_path, tiny_models[model], toy_dir, load_reward(toy_reward_spec))
    rows = trainer.row_tokenizer(trainer.data.train)
    states = prompt_states(trainer.model, rows, trainer.tokenizer.pad_token_id, 5, desc="states")
    head, _ = fit_value_head(states, [float(s[:, 0].mean()) for s in states], ValueFitSettings(epochs=2))
    direct = predict(head, states)
    inside = reference_pass(trainer.model, rows, trainer.collator, 7, head).values
    np.testing.assert_allclose(inside, direct, atol=1e-4)


def test_run_warns_and_records_an_uninformative_value(tmp_path, tiny_models, toy_dir, caplog):
    def constant(prompts, completions, **_):
        return [0.5] * len(completions)  # V(x) cannot beat a constant on a constant

    trainer = _trainer(tmp_path, tiny_models["causal"], toy_dir, RewardFunction.from_callables({"c": constant}),
                       max_steps=1, per_device_train_batch_size=8)
    with caplog.at_level(logging.WARNING):
        trainer.prepare_training_signal(trainer.row_tokenizer(trainer.data.train),
                                        trainer.row_tokenizer(trainer._val_records()))
    assert any("V(x) is no better than a constant" in r.message for r in caplog.records)
    import json

    stats = json.loads((tmp_path / "run" / "advantage_stats.json").read_text())
    assert stats["value_fit"]["informative"] is False


@pytest.mark.parametrize("model", ["causal", "seq2seq"])
def test_ridge_v_of_a_prompt_is_the_same_whichever_path_computes_it(tmp_path, tiny_models, toy_dir, toy_reward_spec,
                                                                     model):
    from lolrl.engine.rewards import load_reward

    trainer = _trainer(tmp_path, tiny_models[model], toy_dir, load_reward(toy_reward_spec))
    rows = trainer.row_tokenizer(trainer.data.train)
    states = prompt_states(trainer.model, rows, trainer.tokenizer.pad_token_id, 5, desc="states")
    head, _ = fit_value_head(states, [float(s[:, 0].mean()) for s in states], ValueFitSettings(head="ridge"))
    inside = reference_pass(trainer.model, rows, trainer.collator, 7, head).values
    np.testing.assert_allclose(inside, predict(head, states), atol=1e-4)


def test_run_with_the_ridge_head_reports_it(tmp_path, tiny_models, toy_dir, toy_reward_spec):
    import json

    from lolrl.engine.rewards import load_reward

    trainer = _trainer(tmp_path, tiny_models["causal"], toy_dir, load_reward(toy_reward_spec), value_head="ridge")
    signal = trainer.prepare_training_signal(trainer.row_tokenizer(trainer.data.train),
                                             trainer.row_tokenizer(trainer._val_records()))
    fit = json.loads((tmp_path / "run" / "value_fit.json").read_text())
    assert fit["head"] == "ridge" and fit["ridge_alpha"] in [pytest.approx(a) for a in RIDGE_ALPHAS]
    assert np.isfinite(signal.advantages).all()
    with pytest.raises(ConfigError, match="--value_head must be attention or ridge"):
        OfflineRLConfig(model_name=tiny_models["causal"], output_dir=str(tmp_path), algorithm="a_lol",
                        value_head="linear")


def test_v_from_the_generations_prefill_is_the_same_with_their_cache_warm(tmp_path, tiny_models, toy_dir,
                                                                          toy_reward_spec):
    """V(x) fit to the rewards of pi_ref's validation generation takes its prompt states from that generation's
    prefill; with the generations in the cache (the reference pass's cache cold) the prefill alone recomputes them:
    the same V(x), bit for bit. With --value_source data the states come from a forward of their own."""
    import json

    from lolrl.engine.rewards import load_reward

    def signal(run, **settings):
        trainer = _trainer(tmp_path / run, tiny_models["causal"], toy_dir, load_reward(toy_reward_spec),
                           cache_dir=str(tmp_path / "cache"), **settings)
        out = trainer.prepare_training_signal(trainer.row_tokenizer(trainer.data.train),
                                              trainer.row_tokenizer(trainer._val_records()))
        return out, json.loads((tmp_path / run / "run" / "value_fit.json").read_text())

    cold, cold_fit = signal("cold")
    assert cold_fit["prompt_states"] == "generation"
    cache = tmp_path / "cache"
    assert any(cache.glob("reference_val_generations*"))
    for path in cache.glob("reference_pass*"):
        path.unlink()
    warm, warm_fit = signal("warm")
    assert warm_fit["prompt_states"] == "prefill"
    assert np.array_equal(warm.advantages, cold.advantages)
    assert {k: warm_fit[k] for k in ("cv_mse", "best_epoch")} == {k: cold_fit[k] for k in ("cv_mse", "best_epoch")}
    _, data_fit = signal("data", value_source="data")
    assert data_fit["prompt_states"] == "forward"
