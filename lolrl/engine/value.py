"""The value estimate V(x): a small attention-pooling head on pi_ref's frozen prompt states.

V(x) is fit to the rewards of pi_ref's own generations on the validation prompts (the expected
reward of the reference policy on a prompt), then gives each training row its advantage
A = R(x, y) - V(x). Compared with the original code:

* the pooling attention takes a key-padding mask, so V(x) does not depend on padding;
* the head regresses standardised targets through an affine output, so any reward range,
  negative rewards included, can be represented (the original's sigmoid x max_value could not);
* the epoch kept is the one with the lowest MSE on held-out validation prompts, not on the
  training loss, and its quality is reported against the constant predictor (R^2).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def _num_heads(hidden_size: int, wanted: int = 8) -> int:
    heads = wanted
    while hidden_size % heads:
        heads //= 2
    return heads


class ValueHead(nn.Module):
    """V(x) = mean + std * w^T Attn(q, H_x, H_x), with a learned query q and a padding mask."""

    def __init__(self, hidden_size: int, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        self.attention = nn.MultiheadAttention(hidden_size, _num_heads(hidden_size, num_heads), batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``states`` [B, L, H], ``mask`` [B, L] with 1 on real prompt tokens -> V(x) [B]."""
        states = self.dropout(states.to(self.query.dtype))
        pooled = self.pool(states, mask)
        score = self.out(self.dropout(pooled))[:, 0, 0]
        return self.target_mean + self.target_std * score

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``self.attention(q, states, states, key_padding_mask=~mask)`` with its own weights, reassociated
        for a single query: the query is pushed through the key projection once (q W_k, [heads, H]) and
        the values are projected after pooling (sum_l a_l S_l) W_v, so the cost per prompt token is
        O(heads x H) instead of the O(H^2) of projecting every state to keys and values. [B, 1, H]."""
        attention = self.attention
        batch, _, width = states.shape
        heads = attention.num_heads
        dim = width // heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        query = ((self.query @ w_q.T + b_q) / math.sqrt(dim)).view(heads, dim)
        key_direction = torch.einsum("hd,hde->he", query, w_k.view(heads, dim, width))
        scores = torch.einsum("ble,he->bhl", states, key_direction) + (query * b_k.view(heads, dim)).sum(-1)[:, None]
        weights = scores.masked_fill(~mask.bool()[:, None, :], float("-inf")).softmax(dim=-1)
        mixed = torch.einsum("bhl,ble->bhe", weights, states)
        values = torch.einsum("bhe,hde->bhd", mixed, w_v.view(heads, dim, width)) + b_v.view(heads, dim)
        return attention.out_proj(values.reshape(batch, 1, width))


class RidgeValueHead(nn.Module):
    """V(x) = mean + std * w^T z(x): ridge regression on the standardised mean of the prompt states,
    z = (mean_l H_x[l] - mu) / sigma. Same call as :class:`ValueHead`; every number is a buffer
    (the closed-form fit of :func:`fit_value_head` fills them)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        for name, shape in (("feature_mean", (hidden_size,)), ("feature_scale", (hidden_size,)),
                            ("weight", (hidden_size,)), ("target_mean", ()), ("target_std", ()), ("alpha", ())):
            self.register_buffer(name, torch.zeros(shape) if name != "feature_scale" else torch.ones(shape))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``states`` [B, L, H], ``mask`` [B, L] with 1 on real prompt tokens -> V(x) [B]."""
        features = (mean_pool(states.to(self.weight.dtype), mask) - self.feature_mean) / self.feature_scale
        return self.target_mean + self.target_std * (features @ self.weight)


HEADS = {"attention": ValueHead, "ridge": RidgeValueHead}


def make_value_head(kind: str, hidden_size: int) -> nn.Module:
    """An empty head of ``kind`` (``attention``: the original's design; ``ridge``) for ``load_state_dict``."""
    if kind not in HEADS:
        raise ValueError(f"value head must be one of {', '.join(HEADS)}, got {kind!r}")
    return HEADS[kind](hidden_size)


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each row's real states: [B, L, H], [B, L] -> [B, H]."""
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length [L_i, H] prompt states into [B, L, H] plus a mask."""
    out = torch.nn.utils.rnn.pad_sequence(states, batch_first=True)
    lengths = torch.tensor([s.shape[0] for s in states], device=out.device)
    mask = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
    return out, mask


# Below this held-out R^2, V(x) is taken as no better than a constant: the run warns and records it.
INFORMATIVE_R2 = 0.05


def r_squared(predictions: np.ndarray, targets: np.ndarray, constant: float) -> float:
    r""":math:`1 - \sum (t - p)^2 / \sum (t - c)^2`: the share of the squared error of the constant
    predictor ``c`` (the training part's mean) that the predictions remove; NaN when the targets equal ``c``."""
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    baseline = float(np.sum((targets - constant) ** 2))
    return 1.0 - float(np.sum((targets - predictions) ** 2)) / baseline if baseline > 0 else float("nan")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson's of the average ranks); NaN when either side is constant."""
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float(np.sum(ra ** 2) * np.sum(rb ** 2)))
    return float(np.sum(ra * rb)) / denominator if denominator > 0 else float("nan")


@dataclass
class ValueFitReport:
    best_epoch: int  # attention head: the epoch kept (0: the initial head); ridge: 0
    heldout_mse: float
    constant_mse: float  # MSE of predicting the training-part mean on the held-out part
    heldout_r2: float
    heldout_spearman: float  # rank correlation of V(x) with the realised rewards on held-out prompts
    n_train: int
    n_heldout: int
    target_mean: float
    target_std: float
    fit_seconds: float = 0.0
    head: str = "attention"
    ridge_alpha: float | None = None  # the ridge penalty chosen by leave-one-out error on the training part

    @property
    def informative(self) -> bool:
        return math.isfinite(self.heldout_r2) and self.heldout_r2 >= INFORMATIVE_R2

    def as_dict(self) -> dict:
        return {**self.__dict__, "informative": self.informative}


@dataclass
class ValueFitSettings:
    epochs: int = 20
    learning_rate: float = 1e-3
    batch_size: int = 32
    heldout_fraction: float = 0.2
    dropout: float = 0.1
    seed: int = 0
    head: str = "attention"  # or "ridge" (:class:`RidgeValueHead`)


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ValueError(f"the value head needs at least 2 validation prompts, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_heldout = min(n - 1, max(1, round(n * fraction)))
    return order[n_heldout:], order[:n_heldout]


def _batches(states: list[torch.Tensor], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad_states(states[start:start + batch_size]) for start in range(0, len(states), batch_size)]


@torch.no_grad()
def _predict_padded(head: ValueHead, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    head.eval()
    values = [head(padded, mask).float().cpu() for padded, mask in batches]
    return torch.cat(values).numpy() if values else np.zeros(0)


def predict(head: ValueHead, states: list[torch.Tensor], batch_size: int = 64) -> np.ndarray:
    return _predict_padded(head, _batches(states, batch_size))


def fit_value_head(states: list[torch.Tensor], targets: list[float],
                   settings: ValueFitSettings = ValueFitSettings(),
                   device: torch.device | str | None = None) -> tuple[nn.Module, ValueFitReport]:
    """Fit V on (prompt states, reward of pi_ref's generation) with ``settings.head``: the attention
    head keeps its best held-out epoch; the ridge head is solved in closed form. Both are judged on
    the same held-out prompts (``settings.heldout_fraction``, ``settings.seed``).

    The fit runs on ``device`` (default: where the states are); the held-out batches are padded
    once, and the head's attention costs O(heads x hidden) per prompt token (:meth:`ValueHead.pool`)."""
    if settings.head == "ridge":
        return fit_ridge_value_head(states, targets, settings)
    make_value_head(settings.head, 1)  # a clear error for an unknown kind
    started = time.perf_counter()
    device = torch.device(device) if device is not None else states[0].device
    states = [s.to(device) for s in states]
    targets_t = torch.tensor(targets, dtype=torch.float32)
    train_idx, held_idx = _split(len(states), settings.heldout_fraction, settings.seed)
    torch.manual_seed(settings.seed)
    head = ValueHead(states[0].shape[-1], dropout=settings.dropout)
    mean, std = targets_t[train_idx].mean(), targets_t[train_idx].std(unbiased=False).clamp(min=1e-6)
    head.target_mean.fill_(mean)
    head.target_std.fill_(std)
    head.to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    held_batches, held_targets = _batches([states[i] for i in held_idx], 64), targets_t[held_idx].numpy()
    targets_d = targets_t.to(device)
    rng = np.random.default_rng(settings.seed)

    def heldout_mse() -> float:
        return float(np.mean((_predict_padded(head, held_batches) - held_targets) ** 2))

    def snapshot() -> dict:
        return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}

    best_mse, best_epoch, best_state = heldout_mse(), 0, snapshot()
    for epoch in tqdm(range(1, settings.epochs + 1), desc="value head", leave=False):
        head.train()
        order = rng.permutation(train_idx)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            padded, mask = pad_states([states[i] for i in batch])
            loss = torch.nn.functional.mse_loss(head(padded, mask), targets_d[torch.as_tensor(batch, device=device)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mse = heldout_mse()
        if mse < best_mse:
            best_mse, best_epoch, best_state = mse, epoch, snapshot()
    head.load_state_dict(best_state)
    held_predictions = _predict_padded(head, held_batches)
    head.cpu().eval()
    constant = float(np.mean((held_targets - float(mean)) ** 2))
    report = ValueFitReport(best_epoch=best_epoch, heldout_mse=best_mse, constant_mse=constant,
                            heldout_r2=r_squared(held_predictions, held_targets, float(mean)),
                            heldout_spearman=spearman(held_predictions, held_targets),
                            n_train=len(train_idx), n_heldout=len(held_idx),
                            target_mean=float(mean), target_std=float(std),
                            fit_seconds=time.perf_counter() - started)
    return head, report


# The ridge penalties tried (on standardised features and targets); the one with the lowest
# leave-one-out error on the training part of the validation prompts is kept.
RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))


def _ridge_loo(features: np.ndarray, targets: np.ndarray, alphas) -> tuple[float, np.ndarray]:
    """``(alpha, weights)`` of the ridge fit (no intercept: features and targets are centred) whose
    leave-one-out squared error is lowest, in closed form: with Z = U S V^T the hat matrix is
    U diag(s^2 / (s^2 + a)) U^T, plus 1/n for the centring, and the leave-one-out residual is
    (y - y_hat) / (1 - h_ii) (exact for a fixed centring and scaling of the features)."""
    u, singular, vt = np.linalg.svd(features, full_matrices=False)
    projected = u.T @ targets
    n = len(targets)
    best = None
    for alpha in alphas:
        shrink = singular ** 2 / (singular ** 2 + alpha)
        fitted = u @ (shrink * projected)
        leverage = np.minimum((u ** 2) @ shrink + 1.0 / n, 1.0 - 1e-9)
        error = float(np.mean(((targets - fitted) / (1.0 - leverage)) ** 2))
        if best is None or error < best[0]:
            best = (error, alpha)
    alpha = best[1]
    weights = vt.T @ (singular / (singular ** 2 + alpha) * projected)
    return alpha, weights


def fit_ridge_value_head(states: list[torch.Tensor], targets: list[float],
                         settings: ValueFitSettings = ValueFitSettings()) -> tuple[RidgeValueHead, ValueFitReport]:
    """The closed-form alternative to the attention head: ridge regression of the standardised targets
    on the standardised mean-pooled prompt states, its penalty chosen by leave-one-out error on the
    training part only, so the held-out R^2 stays an honest estimate."""
    started = time.perf_counter()
    features = torch.stack([s.double().mean(0).cpu() for s in states]).numpy()
    y = np.asarray(targets, dtype=np.float64)
    train_idx, held_idx = _split(len(states), settings.heldout_fraction, settings.seed)
    mean, std = float(y[train_idx].mean()), max(float(y[train_idx].std()), 1e-6)
    f_mean = features[train_idx].mean(0)
    f_scale = features[train_idx].std(0)
    f_scale[f_scale < 1e-6] = 1.0  # a feature constant on the training part: its weight comes out 0
    z = (features - f_mean) / f_scale
    alpha, weights = _ridge_loo(z[train_idx], (y[train_idx] - mean) / std, RIDGE_ALPHAS)
    head = RidgeValueHead(features.shape[1])
    for name, value in (("feature_mean", f_mean), ("feature_scale", f_scale), ("weight", weights),
                        ("target_mean", mean), ("target_std", std), ("alpha", alpha)):
        getattr(head, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    head.eval()
    held_predictions = predict(head, [states[i].cpu() for i in held_idx])
    held_targets = y[held_idx]
    report = ValueFitReport(best_epoch=0, heldout_mse=float(np.mean((held_predictions - held_targets) ** 2)),
                            constant_mse=float(np.mean((held_targets - mean) ** 2)),
                            heldout_r2=r_squared(held_predictions, held_targets, mean),
                            heldout_spearman=spearman(held_predictions, held_targets),
                            n_train=len(train_idx), n_heldout=len(held_idx), target_mean=mean, target_std=std,
                            fit_seconds=time.perf_counter() - started, head="ridge", ridge_alpha=alpha)
    return head, report
