"""The value head V(x): padding invariance, fitting with cross-validated selection and report, predict()."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lolrl.engine.value import INFORMATIVE_R2, ValueFitSettings, ValueHead, fit_value_head, pad_states, predict

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


def test_training_dropout_does_not_depend_on_the_callers_padding():
    """In training mode the head pools the real prompt states in groups of its own (by their lengths), so the
    same seed gives the same dropout and V(x) however much padding the caller's batch carries."""
    torch.manual_seed(0)
    head = ValueHead(H, dropout=0.5).train()
    states = _states(3, seed=7)
    padded, mask = pad_states(states)
    wider = torch.cat([padded, torch.zeros(3, 6, H)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], dim=1)
    torch.manual_seed(1)
    narrow_values = head(padded, mask)
    torch.manual_seed(1)
    wide_values = head(wider, wider_mask)
    torch.testing.assert_close(wide_values, narrow_values, rtol=0, atol=1e-6)
    torch.manual_seed(2)
    assert (head(padded, mask) - narrow_values).abs().max() > 1e-4  # dropout is on: other draws, other values


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


def _fit(shift: float = 0.0, n: int = 80, epochs: int = 10, seed: int = 0):
    states = _states(n, seed=seed)
    targets = [_target(s) + shift for s in states]
    head, report = fit_value_head(states, targets, ValueFitSettings(epochs=epochs, learning_rate=1e-2,
                                                                     batch_size=16, dropout=0.0, seed=seed))
    return states, np.array(targets), head, report


@pytest.fixture(scope="module")
def fitted():
    return _fit()


def test_fit_reaches_a_useful_cross_validated_r2(fitted):
    states, targets, head, report = fitted
    assert report.cv_r2 > 0.5 and report.cv_spearman > 0.5
    assert report.cv_mse < report.constant_mse
    assert report.cv_r2 == pytest.approx(1 - report.cv_mse / report.constant_mse)
    # an estimate for new prompts, not above the fit on the prompts themselves
    assert report.cv_r2 <= report.insample_r2
    insample = 1 - np.sum((predict(head, states) - targets) ** 2) / np.sum((targets - targets.mean()) ** 2)
    assert report.insample_r2 == pytest.approx(insample, rel=1e-4)


def test_report_fields_are_consistent(fitted):
    states, targets, head, report = fitted
    assert report.folds == 5 and report.n_fit == len(states) and len(report.fold_epochs) == 5
    assert 0 < report.best_epoch <= 10  # training improved on the initial head
    assert all(0 <= e <= 10 for e in report.fold_epochs)
    # the final head is fit on every prompt: its target scaling is theirs
    assert report.target_mean == pytest.approx(float(targets.mean()), abs=1e-5)
    assert report.target_std == pytest.approx(float(targets.std()), rel=1e-4)
    d = report.as_dict()
    assert set(d) >= {"best_epoch", "cv_mse", "constant_mse", "cv_r2", "cv_spearman", "folds", "n_fit",
                      "insample_r2", "informative"}


def test_the_final_head_is_trained_on_every_prompt_for_the_chosen_epochs(fitted):
    """The returned head is a fresh head trained on all prompts for best_epoch epochs, and every prompt's
    target moves it (the old fit never learned from its held-out 20%)."""
    from lolrl.engine.value import train_attention_head

    states, targets, head, report = fitted
    settings = ValueFitSettings(epochs=10, learning_rate=1e-2, batch_size=16, dropout=0.0, seed=0)
    everything = np.arange(len(states))
    again, _ = train_attention_head(states, torch.tensor(targets, dtype=torch.float32), everything, [everything],
                                    report.best_epoch, settings)
    np.testing.assert_allclose(predict(again, states), predict(head, states), atol=1e-5)
    for i in (0, len(states) // 2, len(states) - 1):
        moved = targets.copy()
        moved[i] += 5.0
        other, _ = train_attention_head(states, torch.tensor(moved, dtype=torch.float32), everything, [everything],
                                        report.best_epoch, settings)
        assert np.abs(predict(other, states) - predict(head, states)).max() > 1e-3


def test_zero_epochs_keeps_the_initial_head():
    states, targets, head, report = _fit(epochs=0, n=20)
    assert report.best_epoch == 0 and report.fold_epochs == [0] * 5 and report.n_fit == 20


def test_select_epochs_by_hand():
    """Fold f's epoch count minimises its inner errors (heads that never saw f, on other folds), never its
    own out-of-fold errors; the final one minimises every fold's out-of-fold error."""
    from lolrl.engine.value import select_epochs

    judged = np.array([[1.0, 6.0, 9.0],   # each fold's own minimum (epoch 0, 1, 2) is never its choice below
                       [8.0, 2.0, 9.0],
                       [9.0, 8.0, 3.0]])
    inner = np.array([[5.0, 4.0, 1.0],
                      [0.5, 3.0, 2.0],
                      [2.0, 1.0, 7.0]])
    # folds: argmin of each inner row -> 2, 0, 1; final: judged column sums 18, 16, 21 -> 1
    assert select_epochs(judged, inner) == ([2, 0, 1], 1)
    flat = np.ones((3, 3))
    assert select_epochs(flat, flat) == ([0, 0, 0], 0)  # ties: the fewest epochs


def test_cross_validation_fits_and_selection_by_hand(monkeypatch):
    """k + 1 fits: a head without each neighbour pair of folds {f, f + 1 mod k}, then the final head on
    every prompt. Fold f is predicted by the head without {f, f + 1} at the epoch count where the heads
    without {f - 1, f} (on f - 1) and without {f, f + 1} (on f + 1) err least. Recomputed by hand."""
    import lolrl.engine.value as value

    states = _states(25, seed=6)
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=6, learning_rate=1e-2, batch_size=8, dropout=0.1, seed=3)
    calls = []
    train = value.train_attention_head

    def counted(states, targets, train_idx, watched, epochs, settings, fit_id=0, enough=None):
        calls.append((tuple(train_idx), epochs, fit_id))
        return train(states, targets, train_idx, watched, epochs, settings, fit_id, enough)

    monkeypatch.setattr(value, "train_attention_head", counted)
    head, report = value.fit_value_head(states, targets, settings)
    fold = value.fold_assignment(25, 5, 3)
    pairs = [(f, (f + 1) % 5) for f in range(5)]
    without_pair = [tuple(np.flatnonzero((fold != f) & (fold != g))) for f, g in pairs]
    # the pair fits run side by side (any order), the final one after them: on every prompt, up to every epoch
    # (it may run ahead of the choice, :data:`FINAL_AHEAD_BYTES`), its result the head trained for the chosen count
    assert sorted(calls[:5], key=lambda c: c[2]) == [(without_pair[f], 6, 1 + f) for f in range(5)]
    assert calls[5:] == [(tuple(range(25)), 6, 0)]
    chosen, _ = train(states, torch.tensor(targets), np.arange(25), [], report.best_epoch, settings, 0)
    assert all(torch.equal(t, chosen.state_dict()[name]) for name, t in head.state_dict().items())
    y, t = np.array(targets), torch.tensor(targets)
    members = [np.flatnonzero(fold == f) for f in range(5)]

    def error(curve, f):
        return ((curve - y[members[f]]) ** 2).sum(axis=1)

    judged, inner = [], np.zeros((5, 7))
    for i, (f, g) in enumerate(pairs):
        _, (on_f, on_g) = train(states, t, np.array(without_pair[i]), [members[f], members[g]], 6, settings, 1 + i)
        judged.append(on_f)
        inner[f] += error(on_g, g)  # the head without f and g, scored on g, selects for f
        inner[g] += error(on_f, f)
    # e.g. fold 0: the heads without {4, 0} (scored on fold 4) and without {0, 1} (scored on fold 1)
    expected = [int(np.argmin(inner[f])) for f in range(5)]
    assert report.fold_epochs == expected
    assert report.best_epoch == int(np.argmin(sum(error(judged[f], f) for f in range(5))))
    oof = np.empty(25)
    for f in range(5):
        oof[members[f]] = judged[f][expected[f]]
    assert report.cv_mse == pytest.approx(float(np.mean((oof - y) ** 2)), rel=1e-6)


@pytest.mark.parametrize("probability", [0.0, 0.1, 0.5, 0.9, 230.5 / 256, 1.0 - 2 ** -20, 1.0])
def test_bernoulli_mask_rate(probability):
    """:func:`bernoulli_mask`: booleans whose mean is ``probability`` within 5 standard deviations over 2^22 draws,
    also where a byte equal to floor(q) decides by a second uniform (q = ``probability`` x 256: half of them here
    for 230.5 / 256, all but 2^-20 of them for 1 - 2^-20); never False at probability 1 nor True at 0; the same
    seed, the same mask."""
    from lolrl.engine.value import bernoulli_mask

    count = 2 ** 22 + 3  # not a multiple of 8: the last 64-bit draw is cut
    mask = bernoulli_mask(np.random.default_rng(7), count, probability)
    assert mask.shape == (count,) and mask.dtype == np.bool_
    assert abs(mask.mean(dtype=np.float64) - probability) <= 5 * math.sqrt(probability * (1 - probability) / count)
    if probability in (0.0, 1.0):
        assert mask.min() == mask.max() == probability
    np.testing.assert_array_equal(bernoulli_mask(np.random.default_rng(7), count, probability), mask)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_outside_zero_to_one_is_refused(dropout):
    with pytest.raises(ValueError, match="dropout"):
        ValueHead(H, dropout=dropout)


@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_dropout_masks_keep_each_element_with_probability_one_minus_p(source):
    """:meth:`ValueHead._kept`: independent draws, each 1 with probability 1 - p (10^6 draws within 5 standard
    deviations, also in each half and for neighbouring pairs), the same from the same seed, new ones as the
    stream moves on; :meth:`ValueHead.drop` zeroes the rest and scales the kept by 1 / (1 - p), and
    :meth:`ValueHead._drop_states` zeroes the same elements without scaling; eval: identity."""
    p = 0.3
    head = ValueHead(H, dropout=p).train()

    def seeded():
        return np.random.default_rng(12) if source == "numpy" else torch.Generator().manual_seed(12)

    head.generator = seeded()
    shape = torch.Size([1000, 1001])  # an odd count: the last 64-bit draw is split
    kept = head._kept(shape, torch.device("cpu"))
    assert kept.shape == shape and kept.dtype == torch.float32 and set(kept.unique().tolist()) == {0.0, 1.0}
    flat = kept.flatten().double()
    tolerance = 5 * math.sqrt(p * (1 - p) / flat.numel())
    assert abs(flat.mean().item() - (1 - p)) < tolerance
    for half in flat.chunk(2):
        assert abs(half.mean().item() - (1 - p)) < 2 * tolerance
    both = (flat[:-1:2] * flat[1::2]).mean().item()  # neighbours (parts of one 64-bit draw) are independent
    assert abs(both - (1 - p) ** 2) < 3 * tolerance
    assert not torch.equal(head._kept(shape, torch.device("cpu")), kept)  # the stream moved on
    head.generator = seeded()
    assert torch.equal(head._kept(shape, torch.device("cpu")), kept)  # the same seed, the same mask
    x = torch.randn(50, 7, H)
    head.generator = seeded()
    dropped = head.drop(x)
    head.generator = seeded()
    torch.testing.assert_close(dropped, x * head._kept(x.shape, x.device) / (1 - p), rtol=0, atol=1e-6)
    head.generator = seeded()
    states = head._drop_states(x)  # the states' dropout: the same draws, unscaled, in one pass
    head.generator = seeded()
    assert torch.equal(states, x * head._kept(x.shape, x.device))
    head.generator = seeded()
    half = head._drop_states(x.bfloat16())  # numpy has no bfloat16: torch's product, the same draws
    head.generator = seeded()
    assert torch.equal(half, x.bfloat16() * head._kept(x.shape, x.device))
    assert torch.equal(head.eval().drop(x), x)


def test_pair_fits_side_by_side_give_the_one_thread_result(monkeypatch):
    """The cross-validation's pair fits run in threads (:data:`FIT_THREADS`); each draws its initial head,
    batch order and dropout from its own seeded streams, so 1, 2 or 5 threads give the same report and the
    same head, bit for bit."""
    import lolrl.engine.value as value

    states = _states(30, seed=9)
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=4, learning_rate=1e-2, batch_size=8, dropout=0.2, seed=2)
    results = []
    for threads in (1, 2, 5, 2):
        monkeypatch.setattr(value, "FIT_THREADS", threads)
        head, report = fit_value_head(states, targets, settings)
        results.append((head.state_dict(), {k: v for k, v in report.as_dict().items() if k != "fit_seconds"}))
    first_state, first_report = results[0]
    for state, report in results[1:]:
        assert report == first_report
        assert state.keys() == first_state.keys()
        assert all(torch.equal(state[k], first_state[k]) for k in state)


@pytest.mark.parametrize("copies", [0, 2, 100])  # waits at once; after two epochs; never
def test_the_final_head_trained_ahead_of_its_epoch_count_is_the_head_trained_after(monkeypatch, copies):
    """The final head starts on the first thread the pair fits leave idle and trains ahead of the choice of its
    epoch count, keeping a copy after each epoch while the copies fit in :data:`FINAL_AHEAD_BYTES`, then waits.
    The pair fits held back until it has run ahead: the report and the head are those of one thread, where it
    starts after the choice, bit for bit, whether it kept no copy, two, or every one."""
    import threading

    import lolrl.engine.value as value

    states = _states(30, seed=12)
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=12, learning_rate=3e-2, batch_size=8, dropout=0.1, seed=5)
    train, ran, ahead = value.train_attention_head, [], threading.Event()

    def recorded(*args, **kwargs):
        if kwargs.get("enough") is not None:
            counted = kwargs["enough"]
            kwargs["enough"] = lambda done, head: ran.append(done) or counted(done, head)
        return train(*args, **kwargs)

    monkeypatch.setattr(value, "train_attention_head", recorded)
    monkeypatch.setattr(value, "FIT_THREADS", 1)
    first_head, first = fit_value_head(states, targets, settings)
    assert 0 < first.best_epoch < settings.epochs  # so that a head trained past it must be rolled back
    assert ran == list(range(first.best_epoch + 1))  # one thread: no idle one, it trains after the choice
    ran.clear()
    size = sum(t.numel() * t.element_size() for t in first_head.state_dict().values())
    last = settings.epochs - 1 if copies == 100 else copies  # the epoch it goes to alone: the last, or its wait

    def held_back(*args, **kwargs):
        if kwargs.get("enough") is None:  # a pair fit
            assert ahead.wait(timeout=20)
            return train(*args, **kwargs)
        counted = kwargs["enough"]

        def enough(done, head):
            ran.append(done)
            if done == last:
                ahead.set()
            return counted(done, head)
        return train(*args, **(kwargs | {"enough": enough}))

    monkeypatch.setattr(value, "train_attention_head", held_back)
    monkeypatch.setattr(value, "FIT_THREADS", 6)  # every pair fit and the final one at once
    monkeypatch.setattr(value, "FINAL_AHEAD_BYTES", copies * size)
    head, report = fit_value_head(states, targets, settings)
    assert {k: v for k, v in report.as_dict().items() if k != "fit_seconds"} == \
        {k: v for k, v in first.as_dict().items() if k != "fit_seconds"}
    assert all(torch.equal(t, first_head.state_dict()[name]) for name, t in head.state_dict().items())
    # how far it went: every epoch when the copies never run out, else to the larger of the copies and the choice
    assert max(ran) == (settings.epochs - 1 if copies == 100 else max(copies, first.best_epoch))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_fit_ignores_the_callers_autocast(monkeypatch, threads):
    """The head is fit in float32 as the reference pass applies it (without autocast): called under bfloat16
    autocast, the fit gives the head and report it gives without, bit for bit (the final head once ran in the
    caller's thread, under its autocast, while the pair fits ran without)."""
    import lolrl.engine.value as value

    monkeypatch.setattr(value, "FIT_THREADS", threads)
    states = _states(25, seed=13)
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=5, learning_rate=1e-2, batch_size=8, dropout=0.1, seed=1)
    plain_head, plain = fit_value_head(states, targets, settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head, report = fit_value_head(states, targets, settings)
    assert {k: v for k, v in report.as_dict().items() if k != "fit_seconds"} == \
        {k: v for k, v in plain.as_dict().items() if k != "fit_seconds"}
    assert all(torch.equal(t, plain_head.state_dict()[name]) for name, t in head.state_dict().items())


@pytest.mark.parametrize("kind", ["attention", "ridge"])
def test_a_head_computes_in_float32_under_autocast(kind):
    """V(x) as the reference pass applies it, under the training precision's bf16 autocast: the same values as
    without, bit for bit (the head computes in its own dtype)."""
    from lolrl.engine.value import make_value_head

    torch.manual_seed(3)
    head = make_value_head(kind, H).eval()
    for buffer in head.buffers():
        buffer.copy_(torch.rand_like(buffer) + 0.5)
    padded, mask = pad_states(_states(6, seed=4))
    with torch.no_grad():
        plain = head(padded, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = head(padded, mask)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_the_cpu_fit_runs_on_one_thread_and_restores_the_count(monkeypatch):
    """The head's small operations run on one intra-op thread on CPU (no thread barriers to wait on a
    shared machine); the caller's thread count is back afterwards, also after an error."""
    import lolrl.engine.value as value

    seen = []
    train = value.train_attention_head

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(value, "train_attention_head", spy)
    torch.set_num_threads(2)
    states = _states(10, seed=8)
    value.fit_value_head(states, [_target(s) for s in states], ValueFitSettings(epochs=1))
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    monkeypatch.setattr(value, "train_attention_head", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        value.fit_value_head(states, [_target(s) for s in states], ValueFitSettings(epochs=1))
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


@pytest.mark.parametrize("seed", [0, 1])
def test_noise_targets_get_no_credit(seed):
    """Pure-noise targets on 30 prompts: the cross-validated R^2 is at most about 0, while the old figure
    (best of the epochs on a 20% held-out part, R^2 then computed on that same part) credits the noise."""
    from lolrl.engine.value import train_attention_head

    states = _states(30, seed=10 + seed)
    targets = np.random.default_rng(seed).normal(size=30)
    settings = ValueFitSettings(epochs=15, learning_rate=1e-2, batch_size=8, dropout=0.0, seed=seed)
    _, report = fit_value_head(states, targets.tolist(), settings)
    assert report.cv_r2 < INFORMATIVE_R2 and not report.informative
    order = np.random.default_rng(seed).permutation(30)
    held, train = order[:6], order[6:]
    _, (curve,) = train_attention_head(states, torch.tensor(targets, dtype=torch.float32), train, [held], 15, settings)
    best = int(np.argmin(((curve - targets[held]) ** 2).mean(axis=1)))
    old = 1 - np.sum((curve[best] - targets[held]) ** 2) / np.sum((targets[held] - targets[train].mean()) ** 2)
    assert old > 0.2  # the selection-biased figure the runs reported before


def test_noise_targets_average_no_credit():
    """Over six noise seeds the cross-validated R^2 averages below 0 (an honest figure cannot be biased up on
    noise), while the pooled figure at an epoch chosen on those very predictions (selected_r2) averages higher."""
    cv, chosen = [], []
    for seed in range(6):
        states = _states(30, seed=10 + seed)
        targets = np.random.default_rng(seed).normal(size=30)
        settings = ValueFitSettings(epochs=15, learning_rate=1e-2, batch_size=8, dropout=0.0, seed=seed)
        _, report = fit_value_head(states, targets.tolist(), settings)
        cv.append(report.cv_r2)
        chosen.append(report.selected_r2)
    assert np.mean(cv) < 0.0 and np.mean(cv) < np.mean(chosen)


def test_negative_targets_are_represented():
    states, targets, head, report = _fit(shift=-10.0)
    assert np.all(targets < -5)
    assert report.cv_r2 > 0.5
    assert report.target_mean == pytest.approx(float(targets.mean()), abs=1e-5)
    pred = predict(head, states)
    assert np.all(pred < -5)
    assert float(np.mean((pred - targets) ** 2)) < float(np.var(targets))


def test_too_few_prompts_or_folds_raise():
    with pytest.raises(ValueError, match="at least 3"):
        fit_value_head([torch.randn(3, H)] * 2, [1.0, 2.0], ValueFitSettings(epochs=1))
    with pytest.raises(ValueError, match="at least 3 folds"):
        fit_value_head([torch.randn(3, H)] * 6, [1.0, 2.0] * 3, ValueFitSettings(epochs=1, folds=2))


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


def _attention_forward_padded(head: ValueHead, groups) -> torch.Tensor:
    """:meth:`ValueHead.forward_padded` the straightforward way: nn.MultiheadAttention on each group's dropped-out
    states (the same masks, drawn in the same order: each group's states, then the pooled states)."""
    p = head.dropout.p if head.training else 0.0
    if p > 0:
        groups = [(states * head._kept(states.shape, states.device) / (1 - p), mask) for states, mask in groups]
    pooled = torch.cat([_attention_pool(head, states, mask) for states, mask in groups])
    return head.target_mean + head.target_std * head.out(head.drop(pooled))[:, 0, 0]


@pytest.mark.parametrize("mode, dropout", [("train", 0.3), ("train", 0.0), ("eval", 0.3)])
def test_forward_equals_multihead_attention_on_the_same_dropout(mode, dropout):
    """In training too: V(x) and the gradients of every parameter equal nn.MultiheadAttention's on the same
    dropped-out states, to 1e-5 (groups of several lengths, non-zero biases, a non-trivial affine output); and
    without dropout (eval mode, or p = 0), where the output is reassociated (:meth:`ValueHead._value`), with
    gradients and without."""
    torch.manual_seed(3)
    head = ValueHead(H, dropout=dropout).train(mode == "train")
    for p in head.attention.parameters():
        torch.nn.init.normal_(p, std=0.3)
    head.target_mean.fill_(-1.5)
    head.target_std.fill_(2.0)
    groups = [pad_states(_states(n, seed=n, lo=lo, hi=hi)) for n, lo, hi in ((3, 2, 5), (4, 9, 14), (1, 30, 31))]
    results = []
    for forward in (ValueHead.forward_padded, _attention_forward_padded):
        head.generator = np.random.default_rng(5)
        head.zero_grad()
        values = forward(head, groups)
        (values * torch.arange(1.0, len(values) + 1)).sum().backward()
        results.append((values.detach(), {name: p.grad.clone() for name, p in head.named_parameters()}))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    head.generator = np.random.default_rng(5)
    with torch.no_grad():  # without dropout, V(x) from one product of the states (:meth:`_values_without_grad`)
        torch.testing.assert_close(head.forward_padded(groups), slow, atol=1e-5, rtol=0)


def test_fit_equals_the_multihead_attention_fit(monkeypatch):
    """The value stage's speed-ups keep its results: the same fit (same dropout draws, same epochs)
    as with nn.MultiheadAttention pooling, to 1e-4 on every prediction."""
    states = _states(40, seed=5)
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=4, learning_rate=1e-2, batch_size=16, dropout=0.1)
    fast_head, fast = fit_value_head(states, targets, settings)
    monkeypatch.setattr(ValueHead, "forward_padded", _attention_forward_padded)
    slow_head, slow = fit_value_head(states, targets, settings)
    assert fast.best_epoch == slow.best_epoch > 0 and fast.fold_epochs == slow.fold_epochs
    assert fast.cv_mse == pytest.approx(slow.cv_mse, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(predict(fast_head, states), predict(slow_head, states), atol=1e-4)
    assert fast.fit_seconds > 0


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


def test_ridge_fit_learns_a_linear_signal_and_is_fit_on_every_prompt():
    torch.manual_seed(1)
    states = [torch.randn(int(torch.randint(2, 9, (1,))), H) for _ in range(80)]
    direction = torch.randn(H)
    clean = [float(s.mean(0) @ direction) for s in states]
    targets = [c + 0.05 * float(torch.randn(())) for c in clean]
    settings = ValueFitSettings(head="ridge", seed=0)
    head, report = fit_value_head(states, targets, settings)
    assert report.head == "ridge" and report.cv_r2 > 0.9 and report.n_fit == 80 and report.folds == 5
    np.testing.assert_allclose(predict(head, states[:5]), clean[:5], atol=0.3)
    # every prompt's target takes part in the final head
    for i in (0, 40, 79):
        moved = list(targets)
        moved[i] += 10.0
        other_head, _ = fit_value_head(states, moved, settings)
        assert not torch.equal(other_head.weight, head.weight)


@pytest.mark.parametrize("truth", [0.0, 0.5, 0.8])
def test_ridge_cross_validated_r2_is_close_to_the_truth(truth):
    """Targets a linear function of the mean-pooled states plus noise, its share of the variance known:
    the cross-validated R^2 lands near it (never above the in-sample one), also for pure noise."""
    rng = np.random.default_rng(int(truth * 10))
    states = [torch.tensor(rng.normal(size=(int(rng.integers(2, 9)), H)), dtype=torch.float32) for _ in range(300)]
    signal = np.array([float(s.mean(0)[:4].sum()) for s in states])
    signal = signal / signal.std() * np.sqrt(truth)
    targets = signal + rng.normal(size=300) * np.sqrt(1 - truth)
    _, report = fit_value_head(states, targets.tolist(), ValueFitSettings(head="ridge", seed=0))
    assert report.cv_r2 == pytest.approx(truth, abs=0.1)
    assert report.cv_r2 <= report.insample_r2


# ------------------------------------------------------------------------------- the fit's fast path
def _padded_values(head: ValueHead, padded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V(x) the straightforward way: the whole batch padded to its longest prompt and pooled at once, dropout
    drawn on the real states in row order."""
    states = padded
    if head.training and head.dropout.p > 0:
        real = mask.bool()
        states = torch.zeros_like(padded)
        states[real] = head.drop(padded[real])
    return head.target_mean + head.target_std * head.out(head.drop(head.pool(states, mask)))[:, 0, 0]


def _straightforward_training(states, targets, train_idx, watched, epochs, settings, fit_id=0, enough=None):
    """:func:`train_attention_head` without its speed-ups: every batch padded again at every step, each
    watched set predicted on its own, in padded batches, after every epoch."""
    from lolrl.engine.value import new_fit_head

    head, rng = new_fit_head(states, targets, train_idx, settings, fit_id)  # the same initial head and order
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=0.0, foreach=True)

    def curves_now():
        head.eval()
        with torch.no_grad():
            return [_padded_values(head, *pad_states([states[i] for i in idx])).numpy() for idx in watched]

    curves = [curves_now()]
    for done in range(epochs):
        if enough is not None and enough(done, head):
            break
        head.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            loss = torch.nn.functional.mse_loss(_padded_values(head, *pad_states([states[i] for i in batch])),
                                                targets[torch.as_tensor(batch)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curves.append(curves_now())
    return head, [np.stack([c[w] for c in curves]) for w in range(len(watched))]


@pytest.mark.parametrize("batch_size", [8, 64])  # batches drawn each epoch; one batch of every training row
def test_the_fast_fit_equals_the_straightforward_one(monkeypatch, batch_size):
    """The fit's speed-ups (rows pooled in groups of similar length, padded once when a batch holds every training
    row, the attention's weights projected once a forward, every watched fold predicted in one pass, pair fits in
    two threads) change no result: the same epochs, the same report and V(x) as padding each whole batch at
    every step and predicting each fold on its own, to 1e-6. Without dropout, whose draws depend on the layout
    (the tests above check it on the same draws). Prompt lengths from 2 to 120 tokens, so that a batch splits
    into several groups."""
    import lolrl.engine.value as value

    g = torch.Generator().manual_seed(11)
    lengths = [2, 3, 5, 8, 120, 4, 60, 7, 90, 3, 30, 2, 15, 110, 6, 45, 9, 3, 75, 12, 5, 100, 4, 20]
    states = [torch.randn(n, H, generator=g) for n in lengths]
    targets = [_target(s) for s in states]
    settings = ValueFitSettings(epochs=5, learning_rate=1e-2, batch_size=batch_size, dropout=0.0, seed=4)
    assert len(value.padding_bounded_groups(lengths[:8], max_padding=value.GROUP_PADDING)) > 2
    monkeypatch.setattr(value, "FIT_THREADS", 2)
    fast_head, fast = fit_value_head(states, targets, settings)
    monkeypatch.setattr(value, "FIT_THREADS", 1)
    monkeypatch.setattr(value, "train_attention_head", _straightforward_training)
    slow_head, slow = fit_value_head(states, targets, settings)
    assert fast.best_epoch == slow.best_epoch and fast.fold_epochs == slow.fold_epochs
    for name in ("cv_mse", "constant_mse", "cv_r2", "cv_spearman", "insample_r2", "selected_r2"):
        assert getattr(fast, name) == pytest.approx(getattr(slow, name), abs=1e-6), name
    np.testing.assert_allclose(predict(fast_head, states), predict(slow_head, states), atol=1e-6, rtol=0)
    padded, mask = pad_states(states)
    with torch.no_grad():
        np.testing.assert_allclose(_padded_values(slow_head.eval(), padded, mask).numpy(),
                                   predict(slow_head, states), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lengths", [[5, 4, 5, 4, 4], [2, 40, 3, 25, 2, 9]])  # one group (unsorted), several
def test_rows_pooled_in_length_groups_keep_their_order(lengths):
    torch.manual_seed(5)
    head = ValueHead(H).eval()
    states = [torch.randn(n, H) for n in lengths]
    with torch.no_grad():
        alone = torch.cat([head.forward_rows([s]) for s in states])
        torch.testing.assert_close(head.forward_rows(states), alone, rtol=0, atol=1e-6)
        torch.testing.assert_close(head(*pad_states(states)), alone, rtol=0, atol=1e-6)
