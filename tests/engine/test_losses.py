"""Every per-example loss of lolrl.engine.losses against an independent, hand-written reference.

Values are recomputed with plain Python floats (no library helper), and gradients with respect
to the policy log-probs are compared with hand-derived closed forms: all weights (R, A+, the
importance ratios, the GOLD weights) are stop-gradient constants, so each gradient is a weighted
indicator of the real tokens, plus the derivative of the KL estimator for a_lol_kl.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lolrl.engine.losses import ALGORITHMS, compute_loss, kl_penalty


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor built without an explicit dtype in this module is float64; restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

LENGTHS = [6, 4, 1, 3]  # row 1..3 are right-padded; row 2 has a single real token
B, T = len(LENGTHS), 6


def make_batch(seed: int = 0, lengths=LENGTHS, width=T):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    logprobs = (-F.softplus(torch.randn(b, width, generator=g, dtype=torch.float64))).detach().requires_grad_()
    ref = -F.softplus(torch.randn(b, width, generator=g, dtype=torch.float64))
    mask = torch.zeros(b, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0] * ((b + 3) // 4))[:b]
    rewards = signs * (0.5 + torch.rand(b, generator=g, dtype=torch.float64))
    advantages = -signs * (0.25 + torch.rand(b, generator=g, dtype=torch.float64))  # both signs, other rows
    return logprobs, ref, mask, rewards, advantages


# ---------------------------------------------------------------------------------------------
# An independent reference: plain Python floats, loop over rows and tokens.
# ---------------------------------------------------------------------------------------------

def _clip(z: float, clip) -> float:
    if clip is None:  # -c none: unclipped; -c 0 is the interval [1, 1]
        return z
    return min(max(z, 1.0 - clip), 1.0 + clip)


def reference(algo, lp, ref, mask, rewards, advantages, clip=None, beta=0.1, est="k1", floor=0.1):
    """Returns (batch-mean loss, per-example losses, gradient d loss / d lp as nested lists)."""
    lp, ref, mask = lp.tolist(), ref.tolist(), mask.tolist()
    rewards, advantages = rewards.tolist(), advantages.tolist()
    n_rows, width = len(lp), len(lp[0])
    per_row, grad = [], [[0.0] * width for _ in range(n_rows)]
    for b in range(n_rows):
        toks = [t for t in range(width) if mask[b][t]]
        nll = sum(-lp[b][t] for t in toks)
        seq_log_ratio = sum(lp[b][t] - ref[b][t] for t in toks)
        r, a_pos = rewards[b], max(advantages[b], 0.0)
        dl = {}  # d per-example loss / d lp[b][t] for the real tokens
        if algo == "nll":
            loss = nll
            dl = {t: -1.0 for t in toks}
        elif algo == "wbc":
            loss = r * nll
            dl = {t: -r for t in toks}
        elif algo == "r_gold":
            w = {t: max(math.exp(lp[b][t]), floor) for t in toks}
            loss = r * sum(w[t] * -lp[b][t] for t in toks)
            dl = {t: -r * w[t] for t in toks}
        elif algo in ("r_lol", "a_lol"):
            coef = r if algo == "r_lol" else a_pos
            w = _clip(math.exp(seq_log_ratio), clip)
            loss = coef * w * nll
            dl = {t: -coef * w for t in toks}
        elif algo == "a_lol_ref_free":
            loss = a_pos * nll
            dl = {t: -a_pos for t in toks}
        elif algo == "a_lol_seq":
            w = {t: _clip(math.exp(lp[b][t] - ref[b][t]), clip) for t in toks}
            loss = a_pos * sum(w[t] * -lp[b][t] for t in toks)
            dl = {t: -a_pos * w[t] for t in toks}
        elif algo == "a_lol_kl":
            d = {t: lp[b][t] - ref[b][t] for t in toks}
            if est == "k1":
                kl, dkl = sum(d.values()), {t: 1.0 for t in toks}
            elif est == "k2":
                kl, dkl = 0.5 * sum(v * v for v in d.values()), {t: d[t] for t in toks}
            else:
                kl = sum(math.exp(-v) - 1.0 + v for v in d.values())
                dkl = {t: 1.0 - math.exp(-d[t]) for t in toks}
            loss = a_pos * nll + beta * kl
            dl = {t: -a_pos + beta * dkl[t] for t in toks}
        else:
            raise AssertionError(algo)
        per_row.append(loss)
        for t, v in dl.items():
            grad[b][t] = v / n_rows
    return sum(per_row) / n_rows, per_row, grad


def run(algo, lp, ref, mask, rewards, advantages, **kw):
    loss, stats = compute_loss(algo, lp, mask, rewards=rewards, advantages=advantages, ref_logprobs=ref, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss, stats, grad


CASES = [(a, None, "k1") for a in ALGORITHMS if a != "a_lol_kl"]
CASES += [(a, clip, "k1") for a in ("r_lol", "a_lol", "a_lol_seq") for clip in (0.2, 0.0)]
CASES += [("a_lol_kl", None, est) for est in ("k1", "k2", "k3")]


def test_cases_cover_every_algorithm():
    assert {c[0] for c in CASES} == set(ALGORITHMS)
    assert len(ALGORITHMS) == 8


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("algo,clip,est", CASES)
def test_value_and_gradient_match_the_formula(algo, clip, est, seed):
    lp, ref, mask, rewards, advantages = make_batch(seed)
    # The ratios are not 1, so the importance weights actually do something.
    assert not torch.allclose(lp.detach()[mask], ref[mask])
    kw = dict(clip=clip, kl_beta=0.3, kl_estimator=est, gold_floor=0.25)
    loss, stats, grad = run(algo, lp, ref, mask, rewards, advantages, **kw)
    want, want_rows, want_grad = reference(algo, lp, ref, mask, rewards, advantages, clip=clip, beta=0.3,
                                           est=est, floor=0.25)
    assert loss.shape == ()
    assert abs(loss.item() - want) < 1e-6 * max(1.0, abs(want))
    torch.testing.assert_close(stats["loss"], torch.tensor(want_rows), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, torch.tensor(want_grad), rtol=1e-6, atol=1e-8)
    assert torch.all(grad[~mask] == 0)
    assert stats["loss"].requires_grad is False


def test_mask_dtype_does_not_matter():
    lp, ref, mask, rewards, advantages = make_batch(3)
    for algo in ALGORITHMS:
        loss_bool, _, g_bool = run(algo, lp, ref, mask, rewards, advantages)
        loss_long, _, g_long = run(algo, lp, ref, mask.long(), rewards, advantages)
        loss_float, _, g_float = run(algo, lp, ref, mask.double(), rewards, advantages)
        assert loss_bool.item() == pytest.approx(loss_long.item(), abs=1e-12) == pytest.approx(loss_float.item())
        torch.testing.assert_close(g_bool, g_long)
        torch.testing.assert_close(g_bool, g_float)


# ---------------------------------------------------------------------------------------------
# Clipping of the importance weight
# ---------------------------------------------------------------------------------------------

def _ratio_rows():
    """Row 0: ratio e^4 (far above), row 1: e^-3 (far below), row 2: e^0.05 (inside [0.8, 1.2])."""
    lp = torch.full((3, 5), -1.0)
    ref = lp.clone()
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ref[0, :4] = -2.0   # d_t = +1 on 4 tokens
    ref[1, :3] = 0.0    # d_t = -1 on 3 tokens
    ref[2, :5] = -1.01  # d_t = +0.01 on 5 tokens
    ref[~mask] = -7.0   # padding: would change the ratio if it were counted
    return lp.requires_grad_(), ref, mask


@pytest.mark.parametrize("algo", ["r_lol", "a_lol"])
def test_sequence_weight_is_clamped(algo):
    lp, ref, mask = _ratio_rows()
    ones = torch.ones(3)
    raw = torch.tensor([math.exp(4.0), math.exp(-3.0), math.exp(0.05)])
    nll = torch.tensor([4.0, 3.0, 5.0])
    _, stats, grad = run(algo, lp, ref, mask, ones, ones, clip=0.2)
    torch.testing.assert_close(stats["importance_weight"], torch.tensor([1.2, 0.8, math.exp(0.05)]))
    torch.testing.assert_close(stats["raw_ratio"], raw)
    torch.testing.assert_close(stats["loss"], torch.tensor([1.2, 0.8, math.exp(0.05)]) * nll)
    torch.testing.assert_close(grad, -(torch.tensor([1.2, 0.8, math.exp(0.05)])[:, None] * mask) / 3)
    _, stats, grad = run(algo, lp, ref, mask, ones, ones, clip=None)  # -c none: unclipped
    torch.testing.assert_close(stats["importance_weight"], raw)
    torch.testing.assert_close(stats["loss"], raw * nll)
    torch.testing.assert_close(grad, -(raw[:, None] * mask) / 3)


@pytest.mark.parametrize("algo", ["r_lol", "a_lol", "a_lol_seq"])
@pytest.mark.parametrize("zero", [0, 0.0])
def test_clip_zero_is_an_importance_weight_of_exactly_one(algo, zero):
    """-c 0 is epsilon = 0, the interval [1, 1], as the paper's clip: the loss is the weight-1 loss
    (A+ L or R L) and the gradient -coef * m_t / B, however far pi_theta is from pi_ref."""
    lp, ref, mask = _ratio_rows()
    coef = torch.tensor([0.5, 2.0, 1.5])
    nll = torch.tensor([4.0, 3.0, 5.0])
    _, stats, grad = run(algo, lp, ref, mask, coef, coef, clip=zero)
    assert torch.all(stats["importance_weight"] == 1.0)
    torch.testing.assert_close(stats["loss"], coef * nll)
    torch.testing.assert_close(grad, -(coef[:, None] * mask) / 3)


def test_token_weights_are_clamped_for_a_lol_seq():
    lp, ref, mask = _ratio_rows()
    ones = torch.ones(3)
    _, stats, grad = run("a_lol_seq", lp, ref, mask, ones, ones, clip=0.2)
    per_token = torch.tensor([1.2, 0.8, math.exp(0.01)])
    raw = torch.tensor([math.e, math.exp(-1.0), math.exp(0.01)])
    # Mean over the real tokens only: padding is weight 0, not 1 - eps.
    torch.testing.assert_close(stats["importance_weight"], per_token)
    torch.testing.assert_close(stats["raw_ratio"], raw)  # the same mean, unclipped
    torch.testing.assert_close(grad, -(per_token[:, None] * mask) / 3)
    _, stats, grad = run("a_lol_seq", lp, ref, mask, ones, ones, clip=None)
    per_token = raw
    torch.testing.assert_close(stats["importance_weight"], per_token)
    torch.testing.assert_close(grad, -(per_token[:, None] * mask) / 3)


def test_clip_maps_an_overflowing_float32_ratio_to_one_plus_eps():
    lp = torch.full((2, 100), -0.5, dtype=torch.float32).requires_grad_()
    ref = torch.full((2, 100), -2.0, dtype=torch.float32)  # sum of log-ratios +150: exp would overflow
    ref[1] = 2.0  # -250: exp would underflow to 0
    mask = torch.ones(2, 100, dtype=torch.bool)
    adv = torch.ones(2, dtype=torch.float32)
    loss, stats = compute_loss("a_lol", lp, mask, advantages=adv, ref_logprobs=ref, clip=0.2)
    from lolrl.engine.losses import MAX_LOG_RATIO  # the raw ratio is bounded, finite

    torch.testing.assert_close(stats["raw_ratio"], torch.tensor([MAX_LOG_RATIO, -MAX_LOG_RATIO]).exp().float())
    torch.testing.assert_close(stats["importance_weight"], torch.tensor([1.2, 0.8], dtype=torch.float32))
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,clip,est", CASES)
def test_padding_changes_neither_value_nor_gradient(algo, clip, est):
    lp, ref, mask, rewards, advantages = make_batch(5)
    kw = dict(clip=clip, kl_estimator=est)
    loss, stats, grad = run(algo, lp, ref, mask, rewards, advantages, **kw)
    g = torch.Generator().manual_seed(11)
    lp2 = lp.detach().clone()
    ref2 = ref.clone()
    lp2[~mask] = 5.0 * torch.randn(int((~mask).sum()), generator=g)
    ref2[~mask] = 5.0 * torch.randn(int((~mask).sum()), generator=g)
    lp2.requires_grad_()
    loss2, stats2, grad2 = run(algo, lp2, ref2, mask, rewards, advantages, **kw)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad2, grad, rtol=1e-12, atol=1e-12)
    assert torch.all(grad2[~mask] == 0)
    for key in stats:
        torch.testing.assert_close(stats2[key], stats[key], rtol=1e-12, atol=1e-12)


def test_a_lol_seq_is_finite_with_extreme_values_at_padding():
    lp = torch.full((2, 4), -1.0, dtype=torch.float32)
    ref = lp.clone()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    ref[1, 2:] = -100.0  # padding: exp(-1 + 100) overflows float32
    lp.requires_grad_()
    adv = torch.ones(2, dtype=torch.float32)
    loss, _ = compute_loss("a_lol_seq", lp, mask, advantages=adv, ref_logprobs=ref, clip=None)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ["r_lol", "a_lol", "a_lol_seq"])
def test_unclipped_ratio_stays_finite_on_long_responses(algo, dtype):
    """-c none on 200-token responses: a summed log-ratio of +-1000 (and a per-token one of +-500) would
    overflow exp to inf (loss inf or NaN); bounded at MAX_LOG_RATIO, loss and gradient stay finite."""
    length = 200
    lp = torch.full((4, length), -3.0, dtype=dtype)
    ref = lp.clone()
    ref[0] -= 5.0  # log-ratio +5 per token, +1000 summed: pi_theta >> pi_ref
    ref[1] += 2.5  # -2.5 per token, -500 summed
    ref[2, 7] = -503.0  # one token at +500
    mask = torch.ones(4, length, dtype=torch.bool)
    lp.requires_grad_()
    signal = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=dtype)
    loss, stats = compute_loss(algo, lp, mask, rewards=signal, advantages=signal, ref_logprobs=ref, clip=None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    weight = stats["importance_weight"].float()
    assert torch.isfinite(weight).all()
    from lolrl.engine.losses import MAX_LOG_RATIO

    bound = math.exp(MAX_LOG_RATIO)
    if algo == "a_lol_seq":  # mean token weight
        assert weight[0].item() == pytest.approx(math.exp(5.0), rel=1e-2)
        assert weight[1].item() == pytest.approx(math.exp(-2.5), rel=1e-2)
        assert weight[2].item() == pytest.approx((bound + 199) / 200, rel=1e-2)
    else:
        assert weight[0].item() == pytest.approx(bound, rel=1e-2)
        assert weight[1].item() == pytest.approx(1 / bound, rel=1e-2)
        assert weight[2].item() == pytest.approx(bound, rel=1e-2)
    assert weight[3].item() == 1.0


def test_ratio_bound_leaves_in_range_log_ratios_unchanged():
    """Within the bound the ratio is exactly exp(sum of log-ratios), the hand computation; at it, it is exp(bound)."""
    from lolrl.engine.losses import MAX_LOG_RATIO

    lp, ref, mask, rewards, advantages = make_batch(3)
    ref = ref.clone()
    ref[0] = lp[0].detach() - (MAX_LOG_RATIO - 0.05) / T  # row 0 (all T tokens real): just inside the bound
    loss, stats = compute_loss("a_lol", lp, mask, advantages=advantages, ref_logprobs=ref, clip=None)
    want = [math.exp(sum(a - b for a, b, m in zip(l, r, k) if m))
            for l, r, k in zip(lp.tolist(), ref.tolist(), mask.tolist())]
    assert math.log(want[0]) == pytest.approx(MAX_LOG_RATIO - 0.05)
    assert stats["importance_weight"].tolist() == pytest.approx(want, rel=1e-12)
    ref[0, 3] -= 1.0  # now past it
    _, stats = compute_loss("a_lol", lp, mask, advantages=advantages, ref_logprobs=ref, clip=None)
    assert stats["importance_weight"][0].item() == pytest.approx(math.exp(MAX_LOG_RATIO), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Advantage clamp, GOLD floor, errors, KL estimators
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo,clip", [("a_lol", None), ("a_lol", 0.2), ("a_lol_seq", None), ("a_lol_seq", 0.2),
                                       ("a_lol_ref_free", None)])
def test_negative_advantage_rows_contribute_nothing(algo, clip):
    lp, ref, mask, rewards, advantages = make_batch(7)
    neg = advantages < 0
    assert neg.any() and (~neg).any()
    loss, stats, grad = run(algo, lp, ref, mask, rewards, advantages, clip=clip)
    assert torch.all(stats["loss"][neg] == 0)
    assert torch.all(grad[neg] == 0)
    assert torch.all(stats["advantage"][neg] == 0)
    assert torch.all(grad[~neg][mask[~neg]] < 0)  # positive rows are pushed up
    # Making the negative advantages more negative changes nothing.
    _, _, grad2 = run(algo, lp, ref, mask, rewards, torch.where(neg, advantages - 100.0, advantages), clip=clip)
    torch.testing.assert_close(grad2, grad)


@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
def test_a_lol_kl_negative_advantage_rows_keep_only_the_kl_term(est):
    lp, ref, mask, rewards, advantages = make_batch(7)
    neg = advantages < 0
    beta = 0.3
    _, stats, grad = run("a_lol_kl", lp, ref, mask, rewards, advantages, kl_beta=beta, kl_estimator=est)
    d = (lp.detach() - ref) * mask
    kl = {"k1": d.sum(-1), "k2": 0.5 * (d ** 2).sum(-1), "k3": ((torch.exp(-d) - 1 + d) * mask).sum(-1)}[est]
    dkl = {"k1": torch.ones_like(d), "k2": d, "k3": 1 - torch.exp(-d)}[est] * mask
    torch.testing.assert_close(stats["loss"][neg], beta * kl[neg])
    torch.testing.assert_close(stats["kl_penalty"], kl)
    torch.testing.assert_close(grad[neg], beta * dkl[neg] / B)


def test_r_gold_floor():
    probs = torch.tensor([[0.05, 0.5, 0.09, 0.95], [0.3, 0.01, 0.7, 0.2]])
    lp = probs.log().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([2.0, -1.0])
    for floor in (0.1, 0.25):
        loss, stats, grad = run("r_gold", lp, None, mask, rewards, None, gold_floor=floor)
        weight = torch.where(probs < floor, torch.full_like(probs, floor), probs) * mask
        torch.testing.assert_close(grad, -(rewards[:, None] * weight) / 2)
        torch.testing.assert_close(stats["gold_objective"], -(weight * probs.log()).sum(-1))
        torch.testing.assert_close(stats["loss"], rewards * stats["gold_objective"])
    # the default floor is 0.1
    _, _, grad_default = run("r_gold", lp, None, mask, rewards, None)
    weight = torch.where(probs < 0.1, torch.full_like(probs, 0.1), probs) * mask
    torch.testing.assert_close(grad_default, -(rewards[:, None] * weight) / 2)


def test_unknown_algorithm_raises():
    lp, ref, mask, rewards, advantages = make_batch()
    with pytest.raises(ValueError, match="ppo_clipped"):
        compute_loss("ppo_clipped", lp, mask, rewards=rewards, advantages=advantages, ref_logprobs=ref)


def test_unknown_kl_estimator_raises():
    lp, ref, mask, rewards, advantages = make_batch()
    with pytest.raises(ValueError, match="k4"):
        compute_loss("a_lol_kl", lp, mask, advantages=advantages, ref_logprobs=ref, kl_estimator="k4")
    with pytest.raises(ValueError, match="k7"):
        kl_penalty(lp, ref, mask.double(), "k7")


def test_a_lol_kl_default_is_the_papers_k1_term():
    """Hand-derived: two rows, log-probs lp, ref; L = -sum(lp), L_ref = -sum(ref).
    Row 0: lp = (-1, -2), ref = (-1.5, -1.5): L = 3, L_ref = 3, A+ = 2 -> 2*3 + 0.5*(3 - 3) = 6.
    Row 1: lp = (-0.5, pad), ref = (-2, pad): L = 0.5, L_ref = 2, A = -1 -> A+ = 0 -> 0.5*(2 - 0.5) = 0.75.
    Batch mean 3.375; d/d lp = (-A+ + beta) * m / B: row 0 (-1.5, -1.5)/2, row 1 (0.5, 0)/2."""
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]]).requires_grad_()
    ref = torch.tensor([[-1.5, -1.5], [-2.0, -3.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    adv = torch.tensor([2.0, -1.0])
    loss, stats = compute_loss("a_lol_kl", lp, mask, advantages=adv, ref_logprobs=ref, kl_beta=0.5)
    assert loss.item() == pytest.approx(3.375)
    torch.testing.assert_close(stats["loss"], torch.tensor([6.0, 0.75]))
    torch.testing.assert_close(stats["kl_penalty"], torch.tensor([0.0, 1.5]))  # L_ref - L_theta
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, torch.tensor([[-0.75, -0.75], [0.25, 0.0]]))
    # the default is k1: the same as asking for it, different from k3
    k1, _ = compute_loss("a_lol_kl", lp, mask, advantages=adv, ref_logprobs=ref, kl_beta=0.5, kl_estimator="k1")
    k3, _ = compute_loss("a_lol_kl", lp, mask, advantages=adv, ref_logprobs=ref, kl_beta=0.5, kl_estimator="k3")
    assert k1.item() == loss.item() and k3.item() != pytest.approx(loss.item())


def test_kl_estimators_signs_and_zero():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        lp = -F.softplus(3 * torch.randn(5, 7, generator=g))
        ref = -F.softplus(3 * torch.randn(5, 7, generator=g))
        mask = (torch.rand(5, 7, generator=g) > 0.3).double()
        k1 = kl_penalty(lp, ref, mask, "k1")
        torch.testing.assert_close(k1, ((lp - ref) * mask).sum(-1))
        for est in ("k2", "k3"):
            assert torch.all(kl_penalty(lp, ref, mask, est) >= 0)
            assert torch.all(kl_penalty(lp, lp.clone(), mask, est) == 0)
        assert torch.all(kl_penalty(lp, lp.clone(), mask, "k1") == 0)
    # k1 can be negative (the original's term is not a true KL)
    assert kl_penalty(torch.tensor([[-2.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1), "k1").item() == -1.0
    # the default estimator is k1 (the paper's L_ref - L_theta): here (-0.5 + 1.5) + (-2.0 + 0.2) = -0.8
    lp = torch.tensor([[-0.5, -2.0]])
    ref = torch.tensor([[-1.5, -0.2]])
    torch.testing.assert_close(kl_penalty(lp, ref, torch.ones(1, 2)), torch.tensor([-0.8]))


def test_default_kl_is_k1_and_beta_point_one_in_compute_loss():
    lp, ref, mask, rewards, advantages = make_batch(9)
    loss, _, grad = run("a_lol_kl", lp, ref, mask, rewards, advantages)
    want, _, want_grad = reference("a_lol_kl", lp, ref, mask, rewards, advantages, beta=0.1, est="k1")
    assert loss.item() == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(grad, torch.tensor(want_grad))


def test_pro_two_candidates_matches_closed_form_and_gradient():
    from lolrl.engine.losses import pro_loss

    gen = torch.Generator().manual_seed(0)
    scores = (-torch.rand(5, 2, generator=gen, dtype=torch.float64)).requires_grad_()
    rewards = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    sft = torch.rand(5, generator=gen, dtype=torch.float64) * 10
    loss, stats = pro_loss(scores, rewards, sft, sft_weight=0.05)
    # rank inside: best = higher reward; ranking term = log(1 + exp(T (s_worse - s_best))), T = r_best - r_worse
    best = rewards.argmax(-1)
    worse = 1 - best
    s_best, s_worse = scores[torch.arange(5), best], scores[torch.arange(5), worse]
    temp = rewards[torch.arange(5), best] - rewards[torch.arange(5), worse]
    expected_rank = torch.log1p(torch.exp(temp * (s_worse - s_best)))
    torch.testing.assert_close(stats["ranking_loss"], expected_rank.detach())
    torch.testing.assert_close(loss, (expected_rank + 0.05 * sft).mean())
    (grad,) = torch.autograd.grad(loss, scores)
    sig = torch.sigmoid(temp * (s_worse - s_best)).detach()
    closed = torch.zeros(5, 2, dtype=torch.float64)
    closed[torch.arange(5), best] = -temp * sig / 5
    closed[torch.arange(5), worse] = temp * sig / 5
    torch.testing.assert_close(grad, closed)


def test_pro_three_candidates_and_order_invariance():
    from lolrl.engine.losses import pro_loss

    scores = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    rewards = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    loss, _ = pro_loss(scores, rewards, torch.zeros(1, dtype=torch.float64), sft_weight=0.0)
    s0, s1, s2 = -1.0, -2.0, -0.5
    import math
    k0 = math.log(math.exp(s0 * 2) + math.exp(s1 * 1) + math.exp(s2 * 2)) - s0 * 2  # T = [1, 2], T+ = 2
    k1 = math.log(math.exp(s1 * 1) + math.exp(s2 * 1)) - s1 * 1  # T = [1], T+ = 1
    assert loss.item() == pytest.approx(k0 + k1)
    perm = [2, 0, 1]
    shuffled, _ = pro_loss(scores[:, perm], rewards[:, perm], torch.zeros(1, dtype=torch.float64), sft_weight=0.0)
    assert shuffled.item() == pytest.approx(loss.item())  # candidates are ranked by reward inside


def test_pro_group_loss_scores_rows_by_mean_logprob_and_sums_sft_nll():
    """Rows laid out as groups of candidates: score = mean real-token log-prob, SFT term = summed NLL."""
    from lolrl.engine.losses import pro_loss

    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0],     # prompt 0: two candidates
                             [-4.0, 0.0, 0.0], [-1.0, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([0.3, 1.2, -0.1, 0.4])
    sft_rows = torch.tensor([True, False, False, True])
    loss, stats = compute_loss("pro", logprobs, mask, rewards=rewards, group_size=2, sft_rows=sft_rows,
                               sft_weight=0.05)
    scores = torch.tensor([[-2.0, -0.5], [-4.0, -1.0]])  # (-1-2-3)/3, -0.5/1 ; -4/1, (-1-1)/2
    sft_nll = torch.tensor([6.0, 2.0])  # row 0 (sum 6), row 3 (sum 2)
    expected, _ = pro_loss(scores, rewards.view(2, 2), sft_nll, sft_weight=0.05)
    torch.testing.assert_close(loss, expected)
    assert stats["loss"].shape == (2,)  # one value per prompt
    # the gradient reaches only real tokens
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask] != 0)


def test_one_table_of_algorithms_drives_every_list():
    from lolrl.engine.losses import ADVANTAGE_ALGORITHMS, GROUPED_ALGORITHMS, REWARD_ALGORITHMS, TABLE

    assert ALGORITHMS == ("nll", "wbc", "r_gold", "r_lol", "a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl")
    assert ADVANTAGE_ALGORITHMS == ("a_lol", "a_lol_ref_free", "a_lol_seq", "a_lol_kl")
    assert REWARD_ALGORITHMS == ("wbc", "r_gold", "r_lol") and GROUPED_ALGORITHMS == ("pro",)
    assert [n for n, a in TABLE.items() if a.clip] == ["r_lol", "a_lol", "a_lol_seq"]
    assert [n for n, a in TABLE.items() if a.reference] == ["r_lol", "a_lol", "a_lol_seq", "a_lol_kl"]
    assert TABLE["a_lol"].inputs == ("advantages", "ref_logprobs", "clip")
    assert TABLE["a_lol_kl"].inputs == ("advantages", "ref_logprobs", "kl_beta", "kl_estimator")


def test_losses_take_exactly_their_arguments():
    from lolrl.engine.losses import a_lol_loss, wbc_loss

    lp, ref, mask, rewards, advantages = make_batch(3)
    with pytest.raises(TypeError):
        a_lol_loss(lp, mask, advantages, ref, clipp=0.2)  # a misspelt argument is an error, not ignored
    with pytest.raises(TypeError):
        wbc_loss(lp, mask, rewards, ref_logprobs=ref)
    with pytest.raises(ValueError, match="a_lol needs ref_logprobs"):
        compute_loss("a_lol", lp, mask, advantages=advantages)
    with pytest.raises(ValueError, match="unknown algorithm 'a_lol_typo'"):
        compute_loss("a_lol_typo", lp, mask)


def test_logging_window_keeps_the_extreme_rows_of_the_ratio():
    """train_log.jsonl: the mean of every per-row stat; for the ratio also the min and max over the window's
    rows (not the mean of per-batch extremes)."""
    from lolrl.engine.trainer import window_summary

    window = {"importance_weight": [1.0, 0.5, 1.5, 1.2], "raw_ratio": [1.0, 0.25, 3.0, 1.2], "nll": [2.0, 4.0]}
    summary = window_summary(window)
    assert summary["importance_weight"] == pytest.approx(1.05) and summary["nll"] == 3.0
    assert (summary["importance_weight_min"], summary["importance_weight_max"]) == (0.5, 1.5)
    assert (summary["raw_ratio_min"], summary["raw_ratio_max"]) == (0.25, 3.0)
    assert "nll_min" not in summary and "nll_max" not in summary
