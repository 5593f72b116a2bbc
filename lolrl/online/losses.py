r"""Online PPO's estimators and losses (the HH baseline, :mod:`lolrl.online.ppo`), one function each.

The original ran TRL 0.7.1's ``PPOTrainer``; these are its reward shaping with the KL penalty to the
reference, generalised advantage estimation, whitening, clipped policy and value losses and the
adaptive KL controller. Tensors are ``[B, T]`` over the response tokens, ``mask`` 1 on real tokens
(responses are right-padded, so a row's last real token is its last 1). The offline algorithms'
losses are the table in :mod:`lolrl.engine.losses`.
"""
from __future__ import annotations

import torch

from lolrl.engine.losses import Stats


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    r""":math:`\sum m\,v / \sum m`, over everything (``dim=None``) or along ``dim``."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    r"""Whitening over the masked entries, as TRL:
    :math:`(v - \mu)/\sqrt{\sigma^2 + 10^{-8}}`, with :math:`\mu` the masked mean and :math:`\sigma^2`
    the masked variance with Bessel's correction (:math:`\times n/(n-1)`, :math:`n = \sum m`).
    ``shift_mean=False`` adds :math:`\mu` back (scale only). Needs at least two real entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    if count < 2:
        raise ValueError("whitening needs at least two unmasked values")
    var = masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


PPO_KL_PENALTIES = ("kl", "abs", "mse")


def ppo_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float, kl_penalty: str = "kl") -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token rewards of a rollout with the KL penalty to the frozen reference (reward shaping).

    With :math:`d_t = \log\pi_{old}(y_t|\cdot) - \log\pi_{ref}(y_t|\cdot)` on the sampled tokens and
    the penalty :math:`k_t` = :math:`d_t` (``"kl"``, TRL's default), :math:`|d_t|` (``"abs"``) or
    :math:`\tfrac12 d_t^2` (``"mse"``),

    .. math::
        r_t = -\beta\,k_t + \mathbb 1[t = T]\,S,

    where :math:`S` is the row's (scaled) score and :math:`T` its last real token. ``scores[b]`` =
    :math:`S`; ``kl_coef`` = :math:`\beta`. Returns ``(rewards, k)``, both ``[B, T]`` and 0 on padding.
    """
    d = logprobs - ref_logprobs
    if kl_penalty == "kl":
        k = d
    elif kl_penalty == "abs":
        k = d.abs()
    elif kl_penalty == "mse":
        k = 0.5 * d ** 2
    else:
        raise ValueError(f"unknown KL penalty '{kl_penalty}' (expected one of {', '.join(PPO_KL_PENALTIES)})")
    k = k * mask
    rewards = -kl_coef * k
    last = mask.sum(dim=-1).long() - 1  # right padding: the last real token
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, k


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation (Schulman et al., 2016) over the response tokens.

    .. math::
        \delta_t = r_t + \gamma V_{t+1} - V_t, \qquad
        \hat A_t = \sum_{l \ge 0} (\gamma\lambda)^l \delta_{t+l}, \qquad \hat R_t = \hat A_t + V_t,

    with :math:`V_{T+1} = 0` after a row's last real token (rewards and values are masked, so the
    padding contributes nothing). Returns ``(advantages, returns)``, not whitened, no gradient."""
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    returns = advantages + values
    return advantages.detach(), returns.detach()


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, Stats]:
    r"""PPO's clipped surrogate (Schulman et al., 2017), a masked mean over tokens:

    .. math::
        \rho_t = \exp(\log\pi_\theta(y_t|\cdot) - \log\pi_{old}(y_t|\cdot)),\qquad
        \mathcal L^{clip} = \mathrm{mean}_t \max\big(-\hat A_t\,\rho_t,\;
        -\hat A_t\,\mathrm{clip}(\rho_t, 1-\epsilon, 1+\epsilon)\big).

    Stats: ``clipfrac`` (share of tokens where the clipped term is larger), ``approxkl``
    :math:`\tfrac12\,\mathrm{mean}_t(\log\rho_t)^2`, ``policykl`` :math:`-\mathrm{mean}_t\log\rho_t`,
    ``ratio`` (mean :math:`\rho`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).detach(),
             "approxkl": (0.5 * masked_mean(log_ratio.detach() ** 2, mask)),
             "policykl": masked_mean(-log_ratio.detach(), mask), "ratio": masked_mean(ratio.detach(), mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float = 0.2) -> tuple[torch.Tensor, Stats]:
    r"""PPO's clipped value loss, a masked mean over tokens:

    .. math::
        V^{clip}_t = \mathrm{clip}(V_t, V^{old}_t - \epsilon_v, V^{old}_t + \epsilon_v),\qquad
        \mathcal L^{V} = \tfrac12\,\mathrm{mean}_t \max\big((V_t - \hat R_t)^2, (V^{clip}_t - \hat R_t)^2\big).

    Stats: ``value_clipfrac`` (share of tokens where the clipped error is the larger)."""
    clipped_values = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(error, clipped_error), mask)
    return loss, {"value_clipfrac": masked_mean((clipped_error > error).float(), mask).detach()}


def adaptive_kl_coef(coef: float, current_kl: float, target: float, horizon: float, n_steps: int) -> float:
    r"""One update of the adaptive KL coefficient (Ziegler et al., 2019), as TRL's controller:

    .. math::
        e = \mathrm{clip}(\mathrm{KL}/\mathrm{KL}_{target} - 1, -0.2, 0.2),\qquad
        \beta \leftarrow \beta\,(1 + e\,n/H),

    with KL the rollout's mean summed per-sequence KL, :math:`n` the rollouts in the step and
    :math:`H` the horizon."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
