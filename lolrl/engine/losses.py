r"""Every per-example loss of the offline policy-gradient family, written as the paper's math.

Notation (all tensors have a batch dimension B and a token dimension T):

* ``logprobs[b, t]`` = :math:`\log\pi_\theta(y_t \mid x, y_{<t})`, with gradient.
* ``ref_logprobs[b, t]`` = :math:`\log\pi_{ref}(y_t \mid x, y_{<t})`, a constant (cached once).
* ``mask[b, t]`` = :math:`m_t \in \{0, 1\}`, 1 on real response tokens.
* :math:`L^\theta = -\sum_t m_t \log\pi_\theta(y_t|\cdot)`: the sequence NLL (a sum, not a mean).
* :math:`R`: the reward of the row; :math:`A^+ = \max(R - V(x), 0)`: its positive advantage.
* :math:`\mathrm{sg}[\cdot]`: stop-gradient;
  :math:`\mathrm{clip}_\varepsilon(z)=\min(\max(z,1-\varepsilon),1+\varepsilon)`.

Each function returns ``(loss, stats)``: ``loss`` has shape ``[B]`` (the trainer takes its mean
over the batch) and ``stats`` holds detached per-example tensors for logging. Every weight is a
constant with respect to :math:`\theta`, so each gradient is a weighted
:math:`\nabla_\theta \log\pi_\theta(y|x)`, as in the paper.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")

Stats = dict[str, torch.Tensor]


def sequence_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r""":math:`L = -\sum_t m_t \log\pi(y_t|\cdot)`, one value per row."""
    return -(logprobs * mask).sum(dim=-1)


def clip_weight(weight: torch.Tensor, clip: float | None) -> torch.Tensor:
    r""":math:`\mathrm{clip}_\varepsilon` with :math:`\varepsilon` = ``clip``, as the paper's clip:
    ``clip=0`` gives a weight of exactly 1 (the interval :math:`[1, 1]`); only ``None`` leaves the
    weight unclipped (``-c none``)."""
    if clip is None:
        return weight
    return weight.clamp(min=1.0 - clip, max=1.0 + clip)


def nll_loss(logprobs, mask) -> tuple[torch.Tensor, Stats]:
    r"""NLL / behaviour cloning: :math:`\mathcal L = L^\theta`."""
    nll = sequence_nll(logprobs, mask)
    return nll, {"nll": nll.detach()}


def wbc_loss(logprobs, mask, rewards) -> tuple[torch.Tensor, Stats]:
    r"""Weighted behaviour cloning: :math:`\mathcal L = R \cdot L^\theta`.

    The reward is not clamped: a negative reward pushes the likelihood of :math:`y` down."""
    nll = sequence_nll(logprobs, mask)
    return rewards * nll, {"nll": nll.detach(), "reward": rewards}


def r_gold_loss(logprobs, mask, rewards, gold_floor: float = 0.1) -> tuple[torch.Tensor, Stats]:
    r"""Reward-weighted GOLD (Pang & He, 2021):
    :math:`\mathcal L = R \sum_t m_t\, \mathrm{sg}[\max(\pi_\theta(y_t|\cdot), u)]\,(-\log\pi_\theta(y_t|\cdot))`.

    Each token is weighted by the policy's own probability of it, floored at ``gold_floor`` (u)."""
    token_weight = logprobs.detach().exp().clamp(min=gold_floor)
    gold = -(token_weight * logprobs * mask).sum(dim=-1)
    return rewards * gold, {"nll": sequence_nll(logprobs, mask).detach(), "gold_objective": gold.detach(),
                            "reward": rewards}


# The importance ratio's log is clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] before exp, so an unclipped
# weight (-c none) stays finite on long responses: a sum of log-ratios over 200 tokens easily passes 88.7,
# where exp overflows float32 and bfloat16, and the loss became inf * NLL or NaN. exp(20) = 4.9e8 is no
# sane importance weight (the paper clips to [0.1, 1.9]; a clipped weight never sees the bound), and with it
# the weighted loss and the squared gradient norm of a billion-parameter model stay finite in fp32 and bf16.
MAX_LOG_RATIO = 20.0


def bounded_ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    r""":math:`\exp(\mathrm{clamp}(\log r, -20, 20))`: the ratio, finite however long the response
    (see ``MAX_LOG_RATIO``)."""
    return log_ratio.clamp(min=-MAX_LOG_RATIO, max=MAX_LOG_RATIO).exp()


def _sequence_ratio(logprobs, ref_logprobs, mask) -> torch.Tensor:
    r""":math:`\mathrm{sg}[\pi_\theta(y|x)/\pi_{ref}(y|x)] = \exp(\sum_t m_t(\log\pi_\theta - \log\pi_{ref}))`,
    computed in log space and detached, the summed log-ratio bounded by :data:`MAX_LOG_RATIO`."""
    return bounded_ratio(((logprobs.detach() - ref_logprobs) * mask).sum(dim=-1))


def r_lol_loss(logprobs, mask, rewards, ref_logprobs, clip: float | None = None) -> tuple[torch.Tensor, Stats]:
    r"""Reward LoL:
    :math:`\mathcal L = R\cdot\mathrm{clip}_\varepsilon(\mathrm{sg}[\pi_\theta(y|x)/\pi_{ref}(y|x)])\cdot L^\theta`."""
    nll = sequence_nll(logprobs, mask)
    ratio = _sequence_ratio(logprobs, ref_logprobs, mask)
    weight = clip_weight(ratio, clip)
    return rewards * weight * nll, {"nll": nll.detach(), "reward": rewards, "importance_weight": weight,
                                    "raw_ratio": ratio}


def a_lol_loss(logprobs, mask, advantages, ref_logprobs, clip: float | None = None) -> tuple[torch.Tensor, Stats]:
    r"""A-LoL (sequence-level importance weight):
    :math:`\mathcal L = A^+\cdot\mathrm{clip}_\varepsilon(\mathrm{sg}[\pi_\theta(y|x)/\pi_{ref}(y|x)])\cdot L^\theta`.

    Its gradient is the paper's
    :math:`-A^+\,\mathrm{clip}(\pi_\theta/\pi_{ref})\,\nabla_\theta\ln\pi_\theta(y|x)`."""
    adv = advantages.clamp(min=0)
    nll = sequence_nll(logprobs, mask)
    ratio = _sequence_ratio(logprobs, ref_logprobs, mask)
    weight = clip_weight(ratio, clip)
    return adv * weight * nll, {"nll": nll.detach(), "advantage": adv, "importance_weight": weight,
                                "raw_ratio": ratio}


def a_lol_ref_free_loss(logprobs, mask, advantages) -> tuple[torch.Tensor, Stats]:
    r"""A-LoL reference-free: the importance weight is 1, :math:`\mathcal L = A^+\cdot L^\theta`."""
    adv = advantages.clamp(min=0)
    nll = sequence_nll(logprobs, mask)
    return adv * nll, {"nll": nll.detach(), "advantage": adv}


def a_lol_seq_loss(logprobs, mask, advantages, ref_logprobs, clip: float | None = None) -> tuple[torch.Tensor, Stats]:
    r"""A-LoL seq (per-token importance weights; the name is the original's):

    .. math::
        \mathcal L = A^+\sum_t m_t\,\mathrm{clip}_\varepsilon(\mathrm{sg}[\pi_\theta(y_t|\cdot)/\pi_{ref}(y_t|\cdot)])
        \,(-\log\pi_\theta(y_t|\cdot)).
    """
    adv = advantages.clamp(min=0)
    # Mask before exp: a large log-ratio at a padded position would give inf * 0 = NaN.
    token_ratio = bounded_ratio((logprobs.detach() - ref_logprobs) * mask) * mask
    token_weight = clip_weight(token_ratio, clip) * mask
    weighted_nll = -(token_weight * logprobs).sum(dim=-1)
    tokens = mask.sum(-1).clamp(min=1)
    return adv * weighted_nll, {"nll": sequence_nll(logprobs, mask).detach(), "advantage": adv,
                                "importance_weight": token_weight.sum(-1) / tokens,  # the row's mean token weight
                                "raw_ratio": token_ratio.sum(-1) / tokens}  # the same, unclipped


def kl_penalty(logprobs, ref_logprobs, mask, estimator: str = "k1") -> torch.Tensor:
    r"""A per-row estimate of :math:`KL(\pi_\theta\,\|\,\pi_{ref})` on the data tokens, with
    :math:`d_t = \log\pi_\theta(y_t|\cdot) - \log\pi_{ref}(y_t|\cdot)` (gradient through :math:`\pi_\theta`):

    * ``k1`` (the default): :math:`\sum_t m_t d_t = L^{ref} - L^\theta`, the paper's term and the
      original code's. It can be negative and its gradient only shifts the advantage by
      :math:`-\beta`, so rows with :math:`A^+<\beta` are pushed down without bound.
    * ``k2``: :math:`\tfrac12\sum_t m_t d_t^2`, non-negative, pulls :math:`\pi_\theta` towards :math:`\pi_{ref}`.
    * ``k3``: :math:`\sum_t m_t (e^{-d_t} - 1 + d_t)` (Schulman's estimator), non-negative, minimum at :math:`d_t = 0`.
    """
    d = (logprobs - ref_logprobs) * mask
    if estimator == "k1":
        return d.sum(dim=-1)
    if estimator == "k2":
        return 0.5 * (d ** 2).sum(dim=-1)
    if estimator == "k3":
        return ((torch.exp(-d) - 1.0 + d) * mask).sum(dim=-1)
    raise ValueError(f"unknown KL estimator '{estimator}' (expected one of {', '.join(KL_ESTIMATORS)})")


def a_lol_kl_loss(logprobs, mask, advantages, ref_logprobs, kl_beta: float = 0.1,
                  kl_estimator: str = "k1") -> tuple[torch.Tensor, Stats]:
    r"""A-LoL KL: the importance weight is replaced by a KL penalty to the reference,
    :math:`\mathcal L = A^+\cdot L^\theta + \beta\,\widehat{KL}(\pi_\theta\|\pi_{ref})` (see :func:`kl_penalty`).
    The default estimator ``k1`` is the paper's :math:`\beta\,(L^{ref} - L^\theta)`; ``k2``/``k3`` are options."""
    adv = advantages.clamp(min=0)
    nll = sequence_nll(logprobs, mask)
    kl = kl_penalty(logprobs, ref_logprobs, mask, kl_estimator)
    return adv * nll + kl_beta * kl, {"nll": nll.detach(), "advantage": adv, "kl_penalty": kl.detach()}


def pro_loss(scores: torch.Tensor, rewards: torch.Tensor, sft_nll: torch.Tensor,
             sft_weight: float = 0.05) -> tuple[torch.Tensor, Stats]:
    r"""PRO, Preference Ranking Optimization (Song et al., 2023), for ``n`` ranked candidates per prompt.

    ``scores[b, k]`` = :math:`s_k`, the length-normalised log-probability
    :math:`\tfrac{1}{|y_k|}\sum_t \log\pi_\theta(y_{k,t}|\cdot)`; ``rewards[b, k]`` = :math:`r_k`;
    ``sft_nll[b]`` = the summed NLL of the candidate used for the SFT term. Candidates are ranked
    by reward inside the function (the original assumed the file was sorted and flipped the
    preference when it was not). With :math:`T_k^j = r_k - r_j` for :math:`j > k` and
    :math:`T_k^k = \max_{j>k} T_k^j`,

    .. math::
        \mathcal L = -\sum_{k=1}^{n-1} \log\frac{\exp(s_k T_k^k)}{\exp(s_k T_k^k) + \sum_{j>k}\exp(s_j T_k^j)}
        + w\,(n-1)^2\,\mathrm{NLL}_{sft},

    averaged over the batch (``w`` = ``sft_weight``, 0.05 as in the original). With two candidates
    the ranking term is :math:`\log(1 + \exp(T\,(s_1 - s_0)))`.
    """
    per_example, stats = pro_per_example(scores, rewards, sft_nll, sft_weight)
    return per_example.mean(), stats


def pro_per_example(scores: torch.Tensor, rewards: torch.Tensor, sft_nll: torch.Tensor,
                    sft_weight: float = 0.05) -> tuple[torch.Tensor, Stats]:
    """:func:`pro_loss` before the batch mean: one value per prompt."""
    order = rewards.argsort(dim=-1, descending=True)
    s, r = scores.gather(-1, order), rewards.gather(-1, order)
    n = s.shape[-1]
    ranking = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    for k in range(n - 1):
        temperature = r[:, k:k + 1] - r[:, k + 1:]
        top = temperature.max(dim=-1, keepdim=True).values
        logits = torch.cat([s[:, k:k + 1] * top, s[:, k + 1:] * temperature], dim=-1)
        ranking = ranking + torch.logsumexp(logits, dim=-1) - logits[:, 0]
    sft = sft_weight * (n - 1) ** 2 * sft_nll
    return ranking + sft, {"ranking_loss": ranking.detach(), "sft_nll": sft_nll.detach()}


def pro_group_loss(logprobs, mask, rewards, group_size: int, sft_rows: torch.Tensor,
                   sft_weight: float = 0.05) -> tuple[torch.Tensor, Stats]:
    r"""PRO on a batch of rows laid out as consecutive groups of ``group_size`` candidates per prompt.

    Scores are the length-normalised log-probabilities over each candidate's real tokens (the
    original counted suffix tokens 2..L plus one token past the end, an off-by-one); the SFT term
    takes the summed NLL of the row flagged in ``sft_rows`` in each group. See :func:`pro_loss`."""
    scores = (logprobs * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    groups = scores.shape[0] // group_size
    flags = sft_rows.view(groups, group_size).to(logprobs.dtype)
    sft_nll = (sequence_nll(logprobs, mask).view(groups, group_size) * flags).sum(-1)
    return pro_per_example(scores.view(groups, group_size), rewards.view(groups, group_size).to(logprobs.dtype),
                           sft_nll, sft_weight)


@dataclass(frozen=True)
class Algorithm:
    """One row of the table of algorithms: its loss and what it reads."""

    name: str
    loss: Callable[..., tuple[torch.Tensor, Stats]]
    weight: str | None = None  # what scales each row: "reward" (R), "advantage" (A+ = max(R - V(x), 0)) or None
    reference: bool = False  # reads pi_ref's cached log-probs (an importance weight or a KL term)
    clip: bool = False  # has an importance weight to clip (--ppo_clip)
    kl: bool = False  # a KL penalty to pi_ref instead of the importance weight (--kl_beta, --kl_estimator)
    grouped: bool = False  # a training item is a group of candidate responses to one prompt

    @property
    def inputs(self) -> tuple[str, ...]:
        """The loss's arguments besides ``logprobs`` and ``mask``, from its signature."""
        return tuple(n for n in inspect.signature(self.loss).parameters if n not in ("logprobs", "mask"))


TABLE: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("nll", nll_loss),
    Algorithm("wbc", wbc_loss, weight="reward"),
    Algorithm("r_gold", r_gold_loss, weight="reward"),
    Algorithm("r_lol", r_lol_loss, weight="reward", reference=True, clip=True),
    Algorithm("a_lol", a_lol_loss, weight="advantage", reference=True, clip=True),
    Algorithm("a_lol_ref_free", a_lol_ref_free_loss, weight="advantage"),
    Algorithm("a_lol_seq", a_lol_seq_loss, weight="advantage", reference=True, clip=True),
    Algorithm("a_lol_kl", a_lol_kl_loss, weight="advantage", reference=True, kl=True),
    Algorithm("pro", pro_group_loss, weight="reward", grouped=True),
)}
# Lists derived from the table (the names of the command lines' choices and the config's checks).
ALGORITHMS = tuple(n for n, a in TABLE.items() if not a.grouped)  # one response per training item
GROUPED_ALGORITHMS = tuple(n for n, a in TABLE.items() if a.grouped)
ADVANTAGE_ALGORITHMS = tuple(n for n, a in TABLE.items() if a.weight == "advantage")  # need V(x)
REWARD_ALGORITHMS = tuple(n for n in ALGORITHMS if TABLE[n].weight == "reward")  # weighted by the raw reward


def algorithm(name: str) -> Algorithm:
    """The table's entry for ``name``; an unknown name is an error that lists the known ones."""
    if name not in TABLE:
        raise ValueError(f"unknown algorithm '{name}' (expected one of {', '.join(TABLE)})")
    return TABLE[name]


def compute_loss(name: str, logprobs: torch.Tensor, mask: torch.Tensor, *, rewards=None, advantages=None,
                 ref_logprobs=None, clip=None, kl_beta=0.1, kl_estimator="k1", gold_floor=0.1, group_size=1,
                 sft_rows=None, sft_weight=0.05):
    """Dispatch by the algorithm's name: its loss gets exactly the arguments it takes (a batch
    tensor it needs but lacks is an error). Returns the batch-mean loss and per-example (per-group
    for the grouped algorithms) stats."""
    entry = algorithm(name)
    given = dict(rewards=rewards, advantages=advantages, ref_logprobs=ref_logprobs, clip=clip, kl_beta=kl_beta,
                 kl_estimator=kl_estimator, gold_floor=gold_floor, group_size=group_size, sft_rows=sft_rows,
                 sft_weight=sft_weight)
    needed = ("rewards", "advantages", "ref_logprobs", "sft_rows")
    missing = [n for n in needed if n in entry.inputs and given[n] is None]
    if missing:
        raise ValueError(f"{name} needs {', '.join(missing)}")
    mask = mask.to(logprobs.dtype)
    per_example, stats = entry.loss(logprobs=logprobs, mask=mask, **{n: given[n] for n in entry.inputs})
    return per_example.mean(), {"loss": per_example.detach(), **stats}
