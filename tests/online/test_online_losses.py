"""Online PPO's estimators and losses (lolrl.online.losses) against their formulas, and its running moments."""
import math

import numpy as np
import pytest
import torch

from lolrl.online.losses import (
    adaptive_kl_coef,
    gae_advantages,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from lolrl.online.ppo import RunningMoments


def close(tensor, expected, atol=1e-6):
    torch.testing.assert_close(tensor.detach().float(), torch.tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ formulas
def test_gae_three_step_hand_example_and_padding():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 0.25], [0.5, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma, lam)
    # row 0: d2 = 2 - 0.25 = 1.75; d1 = 0 + 0.9*0.25 - 1 = -0.775; d0 = 1 + 0.9*1 - 0.5 = 1.4
    a2 = 1.75
    a1 = -0.775 + gamma * lam * a2
    a0 = 1.4 + gamma * lam * a1
    # row 1 ends at t=1 (the padded reward 99 and value 7 must not leak): d1 = 2 - 0.5; d0 = 1 + 0.9*0.5 - 0.5
    b1 = 1.5
    b0 = 0.95 + gamma * lam * b1
    close(advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 1.0, a2 + 0.25], [b0 + 0.5, b1 + 0.5, 0.0]])
    # gamma = lam = 1 (the original's gamma, lam -> 1): the advantage is the reward-to-go minus the value
    adv1, _ = gae_advantages(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    close(adv1[0], [3.0 - 0.5, 2.0 - 1.0, 2.0 - 0.25])


@pytest.mark.parametrize("ratio, advantage, expected, clipped", [
    (1.1, 1.0, -1.1, False),   # inside the range: -A * ratio
    (1.5, 1.0, -1.2, True),    # a gain beyond 1 + eps is cut off
    (1.5, -1.0, 1.5, False),   # a loss is never clipped away (pessimistic bound)
    (0.5, 1.0, -0.5, False),
    (0.5, -1.0, 0.8, True),    # ratio below 1 - eps with A < 0: clipped at 1 - eps
])
def test_clipped_surrogate(ratio, advantage, expected, clipped):
    old = torch.zeros(1, 2)
    logprobs = torch.full((1, 2), math.log(ratio), requires_grad=True)
    adv = torch.full((1, 2), advantage)
    loss, stats = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 2), cliprange=0.2)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert float(stats["clipfrac"]) == (1.0 if clipped else 0.0)
    assert float(stats["ratio"]) == pytest.approx(ratio)
    assert float(stats["approxkl"]) == pytest.approx(0.5 * math.log(ratio) ** 2)
    loss.backward()
    # d/dlogp of -A * ratio is -A * ratio / 2 per token (mean over 2 tokens); clipped terms have no gradient
    grad = 0.0 if clipped else -advantage * ratio / 2
    close(logprobs.grad, [[grad, grad]])


def test_clipped_surrogate_ignores_padding():
    logprobs = torch.tensor([[math.log(1.1), 5.0]])
    loss, _ = ppo_policy_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]))
    assert float(loss) == pytest.approx(-1.1)


@pytest.mark.parametrize("value, expected, clipped", [
    (0.1, 0.5 * 0.9 ** 2, False),  # |V - V_old| <= 0.2: plain squared error
    (0.5, 0.5 * 0.8 ** 2, True),   # moved 0.5 toward the return: the clipped error (V_old + 0.2) counts
    (-0.5, 0.5 * 1.5 ** 2, False),  # moved away: the larger, unclipped error counts
])
def test_clipped_value_loss(value, expected, clipped):
    values = torch.tensor([[value]], requires_grad=True)
    loss, stats = ppo_value_loss(values, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cliprange_value=0.2)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert float(stats["value_clipfrac"]) == (1.0 if clipped else 0.0)
    loss.backward()
    assert float(values.grad) == pytest.approx(0.0 if clipped else value - 1.0, abs=1e-6)


def test_kl_penalty_on_every_token_and_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, 3.0])
    rewards, kl = ppo_token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    d = (logprobs - ref) * mask
    close(kl, d.tolist())
    close(rewards, [[-0.1 * 0.5, -0.1 * -1.0, 2.0], [-0.1 * 1.0, -0.1 * -0.5 + 3.0, 0.0]])
    _, abs_kl = ppo_token_rewards(scores, logprobs, ref, mask, 0.1, "abs")
    _, mse_kl = ppo_token_rewards(scores, logprobs, ref, mask, 0.1, "mse")
    close(abs_kl, d.abs().tolist())
    close(mse_kl, (0.5 * d ** 2).tolist())
    with pytest.raises(ValueError, match="unknown KL penalty"):
        ppo_token_rewards(scores, logprobs, ref, mask, 0.1, "full")


def test_adaptive_kl_controller():
    # e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert adaptive_kl_coef(0.2, 6.6, 6.0, 10000, 16) == pytest.approx(0.2 * (1 + 0.1 * 16 / 10000))
    assert adaptive_kl_coef(0.2, 60.0, 6.0, 10000, 16) == pytest.approx(0.2 * (1 + 0.2 * 16 / 10000))
    assert adaptive_kl_coef(0.2, 0.0, 6.0, 10000, 16) == pytest.approx(0.2 * (1 - 0.2 * 16 / 10000))
    assert adaptive_kl_coef(0.2, 6.0, 6.0, 10000, 16) == pytest.approx(0.2)


def test_whitening_and_running_moments():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    real = np.array([1.0, 2.0, 3.0, 4.0])
    white = masked_whiten(values, mask)
    expected = (real - real.mean()) / real.std(ddof=1)
    assert white[mask.bool()].tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert masked_whiten(values, mask, shift_mean=False)[mask.bool()].tolist() == \
        pytest.approx((expected + real.mean()).tolist(), abs=1e-4)
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, 16) for _ in range(5)]
    running = RunningMoments()
    for batch in batches:
        running.update(torch.tensor(batch))
    seen = np.concatenate(batches)
    assert running.mean == pytest.approx(seen.mean()) and running.std == pytest.approx(seen.std(ddof=1))
