"""Priority sampling (sampling_weights + EpochSampler): support, distribution, epochs, processes."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare

from lolrl.engine.sampling import EpochSampler, NoPositiveRowsError, sampling_weights

# 8 rows with distinct positive advantages, 4 with non-positive ones (interleaved).
ADV = np.array([0.5, -1.0, 1.0, 1.5, 0.0, 2.0, 2.5, -0.3, 3.0, 3.5, -2.0, 4.0])
POSITIVE = np.flatnonzero(ADV > 0)


def draw_counts(sampler: EpochSampler, min_draws: int, processes=None) -> tuple[np.ndarray, int]:
    """Counts per row over as many epochs as needed for ``min_draws`` draws (all processes' shares)."""
    counts = np.zeros(sampler.n_rows, dtype=np.int64)
    epoch = 0
    samplers = processes or [sampler]
    while counts.sum() < min_draws:
        for s in samplers:
            for batch in s.batches(epoch):
                np.add.at(counts, batch, 1)
        epoch += 1
    return counts, epoch


def test_good_priority_weights_are_the_positive_part():
    w = sampling_weights("good_priority", ADV, len(ADV))
    np.testing.assert_array_equal(w, np.clip(ADV, 0, None))


def test_good_priority_never_yields_a_non_positive_row():
    weights = sampling_weights("good_priority", ADV, len(ADV))
    sampler = EpochSampler(n_rows=len(ADV), batch_size=3, weights=weights, seed=4)
    seen = set()
    for epoch in range(300):
        for batch in sampler.batches(epoch):
            assert len(batch) == 3
            seen.update(batch)
    assert seen == set(POSITIVE.tolist())  # every positive row shows up, and only those


def _chisq_p(counts: np.ndarray, expected_weights: np.ndarray) -> float:
    expected = counts.sum() * expected_weights / expected_weights.sum()
    return chisquare(counts, expected).pvalue


def test_good_priority_frequencies_follow_the_positive_advantage():
    weights = sampling_weights("good_priority", ADV, len(ADV))
    sampler = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=1)
    counts, _ = draw_counts(sampler, 2000)
    assert counts[ADV <= 0].sum() == 0
    pos_counts = counts[POSITIVE]
    assert _chisq_p(pos_counts, ADV[POSITIVE]) > 1e-3
    # The test has power: a uniform sampler over the positive rows would be rejected.
    assert _chisq_p(pos_counts, np.ones(len(POSITIVE))) < 1e-6


def test_chisquare_rejects_a_uniform_sampler():
    """A broken (uniform) sampler fails the same goodness-of-fit check against A+."""
    uniform = EpochSampler(n_rows=len(ADV), batch_size=4,
                           weights=sampling_weights("good_random", ADV, len(ADV)), seed=1)
    counts, _ = draw_counts(uniform, 2000)
    assert _chisq_p(counts[POSITIVE], ADV[POSITIVE]) < 1e-6


def test_good_random_is_uniform_over_positive_rows():
    weights = sampling_weights("good_random", ADV, len(ADV))
    np.testing.assert_array_equal(weights, (ADV > 0).astype(float))
    sampler = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=2)
    counts, _ = draw_counts(sampler, 2000)
    assert counts[ADV <= 0].sum() == 0
    assert _chisq_p(counts[POSITIVE], np.ones(len(POSITIVE))) > 1e-3
    assert _chisq_p(counts[POSITIVE], ADV[POSITIVE]) < 1e-6


@pytest.mark.parametrize("strategy", [None, "None", "none"])
def test_no_strategy_is_a_plain_shuffle(strategy):
    assert sampling_weights(strategy, ADV, len(ADV)) is None
    assert sampling_weights(strategy, None, 5) is None
    sampler = EpochSampler(n_rows=12, batch_size=3, weights=None, seed=0)
    assert sampler.steps_per_epoch == 4
    orders = []
    for epoch in range(5):
        batches = sampler.batches(epoch)
        assert len(batches) == 4 and all(len(b) == 3 for b in batches)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(12))  # every row exactly once
        orders.append(flat)
    assert len({tuple(o) for o in orders}) > 1  # and shuffled differently per epoch


def test_no_strategy_every_row_once_across_processes():
    samplers = [EpochSampler(n_rows=12, batch_size=3, num_processes=2, process_index=p, seed=5) for p in range(2)]
    assert samplers[0].steps_per_epoch == 2
    rows = [i for s in samplers for b in s.batches(3) for i in b]
    assert sorted(rows) == list(range(12))


def test_no_strategy_tops_up_a_partial_last_batch():
    sampler = EpochSampler(n_rows=10, batch_size=4, seed=0)
    batches = sampler.batches(0)
    assert len(batches) == 3 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert set(flat[:10]) == set(range(10))  # one full pass first


@pytest.mark.parametrize("batch_size,num_processes", [(1, 1), (3, 1), (4, 1), (8, 1), (2, 2), (3, 2), (5, 2)])
def test_epoch_is_shortened_to_the_positive_share(batch_size, num_processes):
    weights = sampling_weights("good_priority", ADV, len(ADV))
    n_pos = int((ADV > 0).sum())
    for p in range(num_processes):
        sampler = EpochSampler(n_rows=len(ADV), batch_size=batch_size, num_processes=num_processes,
                               process_index=p, weights=weights, seed=0)
        want = math.ceil(n_pos / (batch_size * num_processes))
        assert sampler.steps_per_epoch == want
        batches = sampler.batches(0)
        assert len(batches) == want
        assert all(len(b) == batch_size for b in batches)


def _pair(weights, lengths=None, seed=3, batch_size=3):
    return [EpochSampler(n_rows=len(ADV), batch_size=batch_size, num_processes=2, process_index=p,
                         weights=weights, seed=seed, lengths=lengths) for p in range(2)]


@pytest.mark.parametrize("strategy", ["good_priority", "None"])
def test_two_processes_take_disjoint_slices_of_one_global_draw(strategy):
    weights = sampling_weights(strategy, ADV, len(ADV))
    p0, p1 = _pair(weights)
    for epoch in range(5):
        glob = p0.global_indices(epoch)
        assert glob == p1.global_indices(epoch)
        b0, b1 = p0.batches(epoch), p1.batches(epoch)
        assert len(b0) == len(b1) == p0.steps_per_epoch
        assert len(glob) == p0.steps_per_epoch * 6
        for step, (x, y) in enumerate(zip(b0, b1)):
            assert len(x) == len(y) == 3
            assert x + y == glob[step * 6:(step + 1) * 6]  # disjoint positions of the same draw


def test_length_grouping_keeps_the_draw_and_the_process_slices():
    weights = sampling_weights("good_priority", ADV, len(ADV))
    lengths = [3, 17, 9, 1, 25, 4, 12, 8, 30, 2, 11, 6]
    plain = _pair(weights)
    grouped = _pair(weights, lengths)
    for epoch in range(10):
        glob = grouped[0].global_indices(epoch)
        assert glob == grouped[1].global_indices(epoch)
        # Grouping only reorders the same multinomial draw.
        assert Counter(glob) == Counter(plain[0].global_indices(epoch))
        b0, b1 = grouped[0].batches(epoch), grouped[1].batches(epoch)
        assert len(b0) == len(b1) == grouped[0].steps_per_epoch
        for step, (x, y) in enumerate(zip(b0, b1)):
            assert sorted(x + y) == sorted(glob[step * 6:(step + 1) * 6])
            assert x + y == glob[step * 6:(step + 1) * 6]
    # Frequencies still follow A+ when both processes' shares are pooled.
    counts, _ = draw_counts(grouped[0], 2000, processes=grouped)
    assert counts[ADV <= 0].sum() == 0
    assert _chisq_p(counts[POSITIVE], ADV[POSITIVE]) > 1e-3
    assert _chisq_p(counts[POSITIVE], np.ones(len(POSITIVE))) < 1e-6


def test_length_grouping_groups_similar_lengths():
    n = 64
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=n).tolist()
    sampler = EpochSampler(n_rows=n, batch_size=8, seed=0, lengths=lengths)
    batches = sampler.batches(0)
    spans = [(min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches]
    # Sorted within one window: the batches' length ranges do not overlap.
    spans.sort()
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))
    assert sorted(i for b in batches for i in b) == list(range(n))


def test_determinism():
    weights = sampling_weights("good_priority", ADV, len(ADV))
    a = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=7)
    b = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=7)
    assert a.batches(3) == b.batches(3)
    assert a.batches(3) != a.batches(4)
    c = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=8)
    assert a.batches(3) != c.batches(3)
    lengths = list(range(1, len(ADV) + 1))
    d = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=7, lengths=lengths)
    e = EpochSampler(n_rows=len(ADV), batch_size=4, weights=weights, seed=7, lengths=lengths)
    assert d.batches(2) == e.batches(2)


@pytest.mark.parametrize("strategy", ["good_priority", "good_random"])
def test_all_non_positive_raises_a_clear_error(strategy):
    with pytest.raises(NoPositiveRowsError, match=r"all 3 training rows have a non-positive"):
        sampling_weights(strategy, np.array([0.0, -1.0, -0.5]), 3)
    assert issubclass(NoPositiveRowsError, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        sampling_weights("good_priority", np.array([1.0, bad, 2.0]), 3)


def test_wrong_length_raises():
    with pytest.raises(ValueError, match="got 3 sampling values for 4 rows"):
        sampling_weights("good_priority", np.array([1.0, 2.0, 3.0]), 4)


def test_missing_values_or_unknown_strategy_raise():
    with pytest.raises(ValueError, match="good_priority"):
        sampling_weights("good_priority", None, 3)
    with pytest.raises(ValueError, match="best_first"):
        sampling_weights("best_first", np.array([1.0, 2.0]), 2)
