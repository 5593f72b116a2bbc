"""The value head V(x): padding invariance, fitting with held-out selection, predict()."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lolrl.engine.value import ValueFitSettings, ValueHead, fit_value_head, pad_states, predict

H = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: intra-op threads only add contention (25x slower on 2 shared cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _states(n: int, seed: int, lo: int = 3, hi: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randn(n_i, H, generator=g) for n_i in lengths]


def _target(s: torch.Tensor) -> float:
    """Mean of the first feature over the real positions."""
    return float(s[:, 0].mean())


def test_pad_states_shapes_and_mask():
    states = [torch.ones(2, H), 2 * torch.ones(5, H), 3 * torch.ones(1, H)]
    padded, mask = pad_states(states)
    assert padded.shape == (3, 5, H) and mask.shape == (3, 5) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [2, 5, 1]
    assert torch.all(padded[0, 2:] == 0) and torch.all(padded[0, :2] == 1)


def test_value_does_not_depend_on_padding():
    torch.manual_seed(0)
    head = ValueHead(H).eval()
    # A non-trivial affine output, so a padding leak would not hide behind a zero readout.
    head.target_mean.fill_(-3.0)
    head.target_std.fill_(2.5)
    short, long_ = _states(2, seed=1, lo=3, hi=4)[0], torch.randn(11, H)
    with torch.no_grad():
        alone = head(short[None], torch.ones(1, short.shape[0], dtype=torch.bool))
        padded, mask = pad_states([short, long_])
        batched = head(padded, mask)
        assert abs(batched[0].item() - alone[0].item()) < 1e-6
        long_alone = head(long_[None], torch.ones(1, 11, dtype=torch.bool))
        assert abs(batched[1].item() - long_alone[0].item()) < 1e-6
        # Garbage at the padded positions changes nothing.
        garbage = padded.clone()
        garbage[0, short.shape[0]:] = 100.0 * torch.randn(11 - short.shape[0], H)
        torch.testing.assert_close(head(garbage, mask), batched, rtol=0, atol=1e-6)
        # ... while the real positions do matter (the head is not constant).
        changed = padded.clone()
        changed[0, 0] += 5.0
        assert abs(head(changed, mask)[0].item() - batched[0].item()) > 1e-4


def test_predict_returns_one_value_per_input_and_ignores_batching():
    torch.manual_seed(1)
    head = ValueHead(H)
    head.train()  # predict must switch to eval mode itself (no dropout noise)
    states = _states(70, seed=2)
    values = predict(head, states)
    assert isinstance(values, np.ndarray) and values.shape == (70,)
    assert not head.training
    single = predict(head, states, batch_size=1)
    np.testing.assert_allclose(values, single, atol=1e-6)
    np.testing.assert_allclose(predict(head, states, batch_size=7), values, atol=1e-6)
    assert predict(head, []).shape == (0,)


def _fit(shift: float = 0.0, n: int = 200, epochs: int = 25, seed: int = 0):
    states = _states(n, seed=seed)
    targets = [_target(s) + shift for s in states]
    head, report = fit_value_head(states, targets, ValueFitSettings(epochs=epochs, learning_rate=3e-3,
                                                                     batch_size=16, heldout_fraction=0.25,
                                                                     dropout=0.0, seed=seed))
    return states, np.array(targets), head, report


def _heldout(report, states, targets, seed=0, fraction=0.25):
    order = np.random.default_rng(seed).permutation(len(states))
    held = order[:report.n_heldout]
    assert report.n_heldout == max(1, round(len(states) * fraction))
    return [states[i] for i in held], targets[held], order[report.n_heldout:]


@pytest.fixture(scope="module")
def fitted():
    return _fit()


def test_fit_reaches_a_useful_r2(fitted):
    states, targets, head, report = fitted
    assert report.heldout_r2 > 0.5
    assert report.heldout_mse < report.constant_mse
    held_states, held_targets, train_idx = _heldout(report, states, targets)
    # The report describes the returned head on the held-out prompts.
    mse = float(np.mean((predict(head, held_states) - held_targets) ** 2))
    assert mse == pytest.approx(report.heldout_mse, rel=1e-5)
    constant = float(np.mean((held_targets - targets[train_idx].mean()) ** 2))
    assert report.constant_mse == pytest.approx(constant, rel=1e-5)
    assert report.heldout_r2 == pytest.approx(1 - report.heldout_mse / report.constant_mse)


def test_report_fields_are_consistent(fitted):
    states, targets, head, report = fitted
    assert report.n_train + report.n_heldout == len(states)
    assert report.n_heldout >= 1 and report.n_train >= 1
    assert 0 <= report.best_epoch <= 25
    assert report.best_epoch > 0  # training improved on the initial head
    _, _, train_idx = _heldout(report, states, targets)
    assert report.target_mean == pytest.approx(float(targets[train_idx].mean()), abs=1e-5)
    assert report.target_std == pytest.approx(float(targets[train_idx].std()), rel=1e-4)
    d = report.as_dict()
    assert set(d) >= {"best_epoch", "heldout_mse", "constant_mse", "heldout_r2", "n_train", "n_heldout"}


def test_zero_epochs_keeps_the_initial_head():
    states, targets, head, report = _fit(epochs=0, n=40)
    assert report.best_epoch == 0
    held_states, held_targets, _ = _heldout(report, states, targets)
    mse = float(np.mean((predict(head, held_states) - held_targets) ** 2))
    assert mse == pytest.approx(report.heldout_mse, rel=1e-5)


def test_selection_uses_the_heldout_split():
    """The kept epoch is the one whose head has the lowest held-out MSE among all epochs run."""
    states = _states(120, seed=4)
    targets = [_target(s) for s in states]
    reports = {}
    for epochs in (1, 2, 3, 4, 5):
        _, reports[epochs] = fit_value_head(states, targets, ValueFitSettings(
            epochs=epochs, learning_rate=3e-3, batch_size=16, dropout=0.0, seed=1))
    # Training is deterministic, so the runs share a trajectory: the best MSE over a longer run is
    # the minimum over a prefix, non-increasing in the number of epochs, and best_epoch <= epochs.
    mses = [reports[e].heldout_mse for e in (1, 2, 3, 4, 5)]
    assert all(b <= a + 1e-9 for a, b in zip(mses, mses[1:]))
    for e, r in reports.items():
        assert 0 <= r.best_epoch <= e
        if 0 < r.best_epoch < e:  # the kept head is the one the shorter run ended on
            assert reports[r.best_epoch].heldout_mse == pytest.approx(r.heldout_mse, rel=1e-6)


@pytest.mark.parametrize("seed", [1, 3])
def test_an_overfitting_run_keeps_its_best_heldout_epoch(seed):
    """Pure-noise targets on 18 training prompts: the held-out MSE gets worse as the head overfits,
    so the kept epoch is an early one, and the returned head is that epoch's, not the last one."""
    states = _states(24, seed=10 + seed)
    targets = np.random.default_rng(seed).normal(size=24)
    settings = dict(learning_rate=1e-2, batch_size=8, dropout=0.0, seed=seed)
    head, report = fit_value_head(states, targets.tolist(), ValueFitSettings(epochs=40, **settings))
    assert 0 < report.best_epoch < 40
    held_states, held_targets, _ = _heldout(report, states, targets, seed=seed, fraction=0.2)
    mse = float(np.mean((predict(head, held_states) - held_targets) ** 2))
    assert mse == pytest.approx(report.heldout_mse, rel=1e-5)
    # The same trajectory stopped at best_epoch ends on the same head.
    short_head, short = fit_value_head(states, targets.tolist(), ValueFitSettings(epochs=report.best_epoch, **settings))
    assert short.best_epoch == report.best_epoch
    np.testing.assert_allclose(predict(short_head, held_states), predict(head, held_states), atol=1e-6)


def test_negative_targets_are_represented():
    states, targets, head, report = _fit(shift=-10.0)
    assert np.all(targets < -5)
    assert report.heldout_r2 > 0.5
    assert report.target_mean == pytest.approx(-10.0, abs=0.3)
    held_states, held_targets, _ = _heldout(report, states, targets)
    pred = predict(head, held_states)
    assert np.all(pred < -5)
    assert float(np.mean((pred - held_targets) ** 2)) < float(np.var(held_targets))


def test_too_few_prompts_raise():
    with pytest.raises(ValueError, match="at least 2"):
        fit_value_head([torch.randn(3, H)], [1.0], ValueFitSettings(epochs=1))


def _attention_pool(head: ValueHead, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The head's pooling as it was computed before the single-query reassociation: nn.MultiheadAttention."""
    query = head.query.expand(states.shape[0], 1, -1)
    pooled, _ = head.attention(query, states, states, key_padding_mask=~mask.bool(), need_weights=False)
    return pooled


def test_single_query_pooling_equals_multihead_attention():
    torch.manual_seed(3)
    head = ValueHead(H).eval()
    for p in head.attention.parameters():  # non-zero biases, so their terms are exercised
        torch.nn.init.normal_(p, std=0.3)
    padded, mask = pad_states(_states(9, seed=4))
    torch.testing.assert_close(head.pool(padded, mask), _attention_pool(head, padded, mask), atol=1e-5, rtol=0)


def test_fit_equals_the_multihead_attention_fit(monkeypatch):
    """The value stage's speed-ups keep its results: the same fit (same dropout draws, same epochs)
    as with nn.MultiheadAttention pooling, to 1e-4 on every prediction."""
    states = _states(120, seed=5)
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=6, learning_rate=3e-3, batch_size=16, dropout=0.1)
    fast_head, fast = fit_value_head(states, targets, settings)
    monkeypatch.setattr(ValueHead, "pool", _attention_pool)
    slow_head, slow = fit_value_head(states, targets, settings)
    assert fast.best_epoch == slow.best_epoch > 0
    assert fast.heldout_mse == pytest.approx(slow.heldout_mse, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(predict(fast_head, states), predict(slow_head, states), atol=1e-4)
    assert fast.fit_seconds > 0


# ------------------------------------------------------------------------------------------ ridge head
def test_ridge_leave_one_out_by_hand():
    """The closed-form leave-one-out error equals refitting without each row (centred data, fixed
    scaling: intercept and features refit on the n - 1 rows), and the weights are (Z'Z + aI)^-1 Z'y."""
    from lolrl.engine.value import _ridge_loo

    rng = np.random.default_rng(3)
    z = rng.normal(size=(12, 4))
    z -= z.mean(0)
    y = z @ np.array([1.0, -2.0, 0.0, 0.5]) + rng.normal(scale=0.3, size=12)
    y -= y.mean()
    for alpha in (0.1, 3.0):
        _, weights = _ridge_loo(z, y, [alpha])
        np.testing.assert_allclose(weights, np.linalg.solve(z.T @ z + alpha * np.eye(4), z.T @ y), atol=1e-12)
        errors = []
        for i in range(12):  # refit by hand on the other 11, with an intercept (their own means)
            keep = np.arange(12) != i
            zk, yk = z[keep] - z[keep].mean(0), y[keep] - y[keep].mean()
            w = np.linalg.solve(zk.T @ zk + alpha * np.eye(4), zk.T @ yk)
            errors.append((y[i] - (y[keep].mean() + (z[i] - z[keep].mean(0)) @ w)) ** 2)
        chosen, _ = _ridge_loo(z, y, [alpha, 1e9])  # the huge penalty predicts ~0 everywhere: worse here
        assert chosen == alpha
        loo = _loo_error(z, y, alpha)
        assert loo == pytest.approx(np.mean(errors), rel=0.05)


def _loo_error(z, y, alpha):
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    shrink = s ** 2 / (s ** 2 + alpha)
    fitted = u @ (shrink * (u.T @ y))
    leverage = (u ** 2) @ shrink + 1 / len(y)
    return float(np.mean(((y - fitted) / (1 - leverage)) ** 2))


def test_ridge_head_is_the_mean_pooled_linear_map_and_ignores_padding():
    from lolrl.engine.value import RidgeValueHead

    head = RidgeValueHead(H)
    torch.manual_seed(0)
    for name in ("feature_mean", "feature_scale", "weight"):
        getattr(head, name).copy_(torch.rand(H) + 0.5)
    head.target_mean.fill_(2.0)
    head.target_std.fill_(3.0)
    states = [torch.randn(3, H), torch.randn(5, H)]
    padded, mask = pad_states(states)
    by_hand = [2.0 + 3.0 * float(((s.mean(0) - head.feature_mean) / head.feature_scale) @ head.weight) for s in states]
    np.testing.assert_allclose(head(padded, mask).numpy(), by_hand, rtol=1e-5)
    longer, longer_mask = pad_states([*states, torch.randn(9, H)])
    np.testing.assert_allclose(head(longer, longer_mask)[:2].numpy(), by_hand, rtol=1e-5)


def test_ridge_fit_learns_a_linear_signal_and_chooses_its_penalty_without_the_heldout_prompts():
    torch.manual_seed(1)
    states = [torch.randn(int(torch.randint(2, 9, (1,))), H) for _ in range(80)]
    direction = torch.randn(H)
    clean = [float(s.mean(0) @ direction) for s in states]
    targets = [c + 0.05 * float(torch.randn(())) for c in clean]
    settings = ValueFitSettings(head="ridge", heldout_fraction=0.25, seed=0)
    head, report = fit_value_head(states, targets, settings)
    assert report.head == "ridge" and report.heldout_r2 > 0.9 and report.n_heldout == 20
    np.testing.assert_allclose(predict(head, states[:5]), clean[:5], atol=0.3)
    # the held-out prompts' targets play no part in the fit (they only judge it)
    scrambled = list(targets)
    for i in np.random.default_rng(0).permutation(80)[:20]:
        scrambled[i] = 100.0
    other_head, other = fit_value_head(states, scrambled, settings)
    assert other.ridge_alpha == report.ridge_alpha and torch.equal(other_head.weight, head.weight)
    assert other.heldout_mse > 100 * report.heldout_mse
