"""The value estimate V(x): a small attention-pooling head on pi_ref's frozen prompt states.

V(x) is fit to the rewards of pi_ref's own generations on the validation prompts (the expected
reward of the reference policy on a prompt), then gives each training row its advantage
A = R(x, y) - V(x). Compared with the original code:

* the pooling attention takes a key-padding mask, so V(x) does not depend on padding;
* the head regresses standardised targets through an affine output, so any reward range,
  negative rewards included, can be represented (the original's sigmoid x max_value could not);
* the number of epochs is chosen by k-fold cross-validation over the validation prompts, not by the
  training loss; the final head is fit on every validation prompt (as the original's), and its
  quality is reported by nested cross-validation against the constant predictor (R^2, rank
  correlation): a figure no prompt both trained or selected and judged.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lolrl.engine.collation import padding_bounded_groups

logger = logging.getLogger(__name__)


def _num_heads(hidden_size: int, wanted: int = 8) -> int:
    heads = wanted
    while hidden_size % heads:
        heads //= 2
    return heads


# The attention head pools rows in groups of similar length, each padded to at most this many times its real
# tokens (None: a batch is one group, padded to its longest row).
GROUP_PADDING: float | None = 1.25


def bernoulli_mask(generator: np.random.Generator, count: int, probability: float) -> np.ndarray:
    """``count`` independent Bernoulli(``probability``) draws as booleans, exactly (to double precision): a uniform
    byte u (eight from each 64-bit output of the generator) gives True when u < floor(q) and False when u > floor(q),
    q = ``probability`` x 256; the few with u = floor(q) (1 in 256) take True with probability q - floor(q) from a
    double uniform. A byte of the generator's output an element (16 bits until FIT_VERSION 5): with the mask applied
    in the same numpy pass (:meth:`ValueHead._drop_states`), the dropout of 1.2 million state elements costs 1.1 ms,
    1.7 ms with 16-bit draws into a float mask; torch's ``bernoulli_`` on CPU takes 6 ns an element."""
    threshold = probability * 256.0
    whole = min(int(threshold), 255)
    bits = generator.bit_generator.random_raw((count + 7) // 8).view(np.uint8)[:count]
    mask = bits < np.uint8(whole)
    edge = np.flatnonzero(bits == whole)
    if edge.size:
        mask[edge] = generator.random(edge.size) < threshold - whole
    return mask


def _without_autocast(method):
    """A head computes in its own dtype (float32) whatever the caller's autocast: it is fit so, and V(x) is applied
    so (the reference pass runs under the training precision's autocast)."""
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with torch.autocast(self.target_mean.device.type, enabled=False):
            return method(self, *args, **kwargs)
    return wrapped


class ValueHead(nn.Module):
    """V(x) = mean + std * w^T Attn(q, H_x, H_x), with a learned query q and a padding mask."""

    def __init__(self, hidden_size: int, num_heads: int = 8, dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"the value head's dropout must be in [0, 1), got {dropout}")
        self.query = nn.Parameter(torch.randn(hidden_size) / math.sqrt(hidden_size))
        self.attention = nn.MultiheadAttention(hidden_size, _num_heads(hidden_size, num_heads), batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        # a fit's own stream of dropout draws (:func:`new_fit_head`: numpy's on CPU, a torch generator on the
        # fit's device), so fits side by side in threads draw what each would draw alone; None: torch's global one
        self.generator: np.random.Generator | torch.Generator | None = None

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``states`` [B, L, H], ``mask`` [B, L] with 1 on real prompt tokens -> V(x) [B] (:meth:`forward_rows`
        on each row's real states)."""
        real = mask.bool()
        return self.forward_rows(list(states[real].split(real.sum(1).tolist())))

    def forward_rows(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """V(x) [B] of each row's real states ``rows`` ([L_b, H] each, no padding). Each row is pooled with rows
        of similar length (:func:`_padded_groups`): a batch's few long prompts do not pad every other prompt to
        their length (HH's validation prompts: 13 to 512 tokens, a batch padded ~4x its real tokens); the
        pooling is per row, so the grouping changes no value."""
        order, groups = _padded_groups(rows, np.arange(len(rows)))  # order: the rows by length
        values = self.forward_padded(groups)
        if (order == np.arange(len(order))).all():
            return values
        return values[torch.as_tensor(np.argsort(order), device=values.device)]  # back to the rows' order

    @_without_autocast
    def forward_padded(self, groups: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """V(x) of the rows of padded groups (states [b, L, H] and mask [b, L] each), in group order.

        The original's head: dropout on the prompt states, attention pooling with the learned query, dropout on
        the pooled state, a linear output. Computed so that a training step's cost is the states' own: the
        attention's weights are taken as its single query uses them once a forward (:meth:`_single_query`),
        each group is pooled to its per-head weighted sums of states (:class:`_AttentionSums`), and the value and
        output projections run once on all rows (their weight gradients are made once a step, not once a
        group). In training the dropout zeroes each state element with probability p (:meth:`_kept`, on a
        group's padding too, which the attention masks out); its 1/(1 - p) is applied to the per-head scores
        and sums, which are linear in the states, instead of to every state element."""
        key_direction, key_bias, w_v, b_v = self._single_query()
        dropout = self.training and self.dropout.p > 0
        if not dropout and not torch.is_grad_enabled():
            return self._values_without_grad(groups, key_direction, key_bias, w_v, b_v)
        dtype = self.query.dtype
        scale = 1.0
        if dropout:
            scale = 1.0 / (1.0 - self.dropout.p)
            groups = [(self._drop_states(states.to(dtype)), mask) for states, mask in groups]
        sums = _AttentionSums.apply(key_direction * scale if scale != 1.0 else key_direction, key_bias,
                                    *(t for states, mask in groups for t in (states.to(dtype), mask.bool())))
        return self._value(sums * scale if scale != 1.0 else sums, w_v, b_v)

    def _value(self, sums: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor) -> torch.Tensor:
        """V(x) from each row's per-head attention sums [B, heads, H]: the attention's output (:meth:`_project`),
        dropout, the linear output. Without the dropout (eval mode, or p = 0) the three are one linear map,
        reassociated (:meth:`_output_direction`), and each row costs O(heads x H) instead of O(H^2)."""
        if self.training and self.dropout.p > 0:
            score = self.out(self.drop(self._project(sums, w_v, b_v)))[:, 0, 0]
        else:
            direction, bias = self._output_direction(w_v, b_v)
            score = (sums * direction).sum((1, 2)) + bias
        return self.target_mean + self.target_std * score

    def _output_direction(self, w_v: torch.Tensor, b_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The value projection, the output projection and the linear output without dropout as one linear map of
        the per-head attention sums: the output weights pushed back through the output and value projections
        (z_h = W_v,h^T (W_o^T w)_h, [heads, H]) and the bias; score = sum_h z_h . sums_h + bias."""
        heads, dim, _ = w_v.shape
        back = self.out.weight[0] @ self.attention.out_proj.weight  # W_o^T w: [H]
        direction = torch.einsum("hd,hde->he", back.view(heads, dim), w_v)  # [heads, H]
        bias = back @ b_v.reshape(-1) + self.out.weight[0] @ self.attention.out_proj.bias + self.out.bias[0]
        return direction, bias

    def _values_without_grad(self, groups: list[tuple[torch.Tensor, torch.Tensor]], key_direction: torch.Tensor,
                             key_bias: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor) -> torch.Tensor:
        """V(x) without dropout and without gradients (predictions, the reference pass): the score is linear in the
        per-head sums, so each state is projected once on the key directions and on the output's directions
        together (z_h . sum_l a_hl s_l = sum_l a_hl (z_h . s_l)): one [tokens, H] x [H, 2 heads] product a group
        reads the states once, where the attention's sums read them twice (scores, then the weighted sums)."""
        direction, bias = self._output_direction(w_v, b_v)
        heads, width = key_direction.shape
        both = torch.cat([key_direction, direction]).T  # [H, 2 heads]
        dtype = self.query.dtype
        scores = []
        for states, mask in groups:
            rows, length = mask.shape
            projected = (states.reshape(-1, width).to(dtype) @ both).view(rows, length, 2, heads)
            weights = (projected[:, :, 0] + key_bias).masked_fill(~mask.bool()[..., None], float("-inf")).softmax(1)
            scores.append((weights * projected[:, :, 1]).sum((1, 2)))
        return self.target_mean + self.target_std * (torch.cat(scores) + bias)

    def _project(self, sums: torch.Tensor, w_v: torch.Tensor, b_v: torch.Tensor) -> torch.Tensor:
        """The attention's output [B, 1, H] from the per-head sums [B, heads, H]: the value projection (one
        batched product over the heads, [heads, dim, H] x [heads, H, B]), then the output projection."""
        values = torch.bmm(w_v, sums.permute(1, 2, 0)).permute(2, 0, 1) + b_v  # [B, heads, dim]
        return self.attention.out_proj(values.reshape(len(sums), 1, -1))

    def _kept(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A float32 dropout mask: each element 1 with probability 1 - p and 0 otherwise, independently, drawn from
        :attr:`generator`: numpy's PCG64 on CPU (:func:`bernoulli_mask`), a torch generator on an accelerator, or
        without one torch's global generator (a float32 uniform below 1 - p)."""
        keep = 1.0 - self.dropout.p
        if isinstance(self.generator, np.random.Generator):
            mask = bernoulli_mask(self.generator, math.prod(shape), keep)
            return torch.from_numpy(mask).view(shape).to(device=device, dtype=torch.float32)
        return (torch.rand(shape, generator=self.generator, device=device) < keep).float()

    def _drop_states(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` with the elements a dropout mask drops set to 0 (not scaled): ``states * self._kept(...)``,
        the same draws, in one numpy pass on CPU (no float mask is made)."""
        numpy_float = states.dtype in (torch.float32, torch.float64)  # numpy has no bfloat16
        if isinstance(self.generator, np.random.Generator) and states.device.type == "cpu" and numpy_float:
            mask = bernoulli_mask(self.generator, states.numel(), 1.0 - self.dropout.p).reshape(states.shape)
            return torch.from_numpy(np.multiply(states.contiguous().numpy(), mask))
        return states * self._kept(states.shape, states.device)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """The head's dropout in training (:meth:`_kept`, scaled by 1 / (1 - p)); the identity in eval mode."""
        p = self.dropout.p
        if not self.training or p == 0:
            return x
        return x * self._kept(x.shape, x.device) * (1.0 / (1.0 - p))

    def _single_query(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention's weights as its one query uses them: the key direction q W_k per head [heads, H],
        the key bias's score per head [heads], the value projection [heads, dim, H] and its bias [heads, dim]."""
        attention = self.attention
        width = self.query.shape[0]
        heads = attention.num_heads
        dim = width // heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
        query = ((self.query @ w_q.T + b_q) / math.sqrt(dim)).view(heads, dim)
        key_direction = torch.einsum("hd,hde->he", query, w_k.view(heads, dim, width))
        return key_direction, (query * b_k.view(heads, dim)).sum(-1), w_v.view(heads, dim, width), b_v.view(heads, dim)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``self.attention(q, states, states, key_padding_mask=~mask)`` with its own weights, reassociated
        for a single query: the query is pushed through the key projection once (q W_k, [heads, H]) and
        the values are projected after pooling (sum_l a_l S_l) W_v, so the cost per prompt token is
        O(heads x H) instead of the O(H^2) of projecting every state to keys and values. [B, 1, H]."""
        key_direction, key_bias, w_v, b_v = self._single_query()
        return self._project(_AttentionSums.apply(key_direction, key_bias, states, mask.bool()), w_v, b_v)


class _AttentionSums(torch.autograd.Function):
    """Each head's attention-weighted sum of each row's prompt states, for rows in padded groups: [B, heads, H],
    the groups' rows in order. A state's score for a head is its product with the head's key direction plus the
    head's key-bias score; a padding position gets weight 0. Arguments: the key directions [heads, H], the
    key-bias scores [heads], then each group's states [b, L, H] and boolean mask [b, L]; the states get no
    gradient.

    One autograd node for all groups, and every product over the states in its fast layout: a training step
    reads a group's states four times (scores, sums; their gradients), each a [heads x H] by [H x tokens]
    product (the layout autograd picks for the key directions' gradient is 3-10x slower on CPU)."""

    @staticmethod
    def forward(ctx, key_direction: torch.Tensor, key_bias: torch.Tensor, *groups: torch.Tensor) -> torch.Tensor:
        heads, width = key_direction.shape
        sums, saved = [], []
        for states, mask in zip(groups[::2], groups[1::2]):
            rows, length = mask.shape
            scores = (key_direction @ states.reshape(-1, width).T).view(heads, rows, length).transpose(0, 1)
            weights = (scores + key_bias[:, None]).masked_fill(~mask[:, None, :], float("-inf")).softmax(dim=-1)
            sums.append(torch.bmm(weights, states))
            saved += [states, weights]
        ctx.save_for_backward(key_direction, *saved)
        return torch.cat(sums)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        key_direction, *saved = ctx.saved_tensors
        heads, width = key_direction.shape
        grad_direction = torch.zeros_like(key_direction)
        grad_bias = key_direction.new_zeros(heads)
        start = 0
        for states, weights in zip(saved[::2], saved[1::2]):
            rows = states.shape[0]
            grad_weights = torch.bmm(grad[start:start + rows].to(states.dtype), states.transpose(1, 2))  # [b, heads, L]
            start += rows
            grad_scores = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))
            grad_direction += (grad_scores.transpose(0, 1).reshape(heads, -1) @ states.reshape(-1, width)).to(
                grad_direction.dtype)
            grad_bias += grad_scores.sum((0, 2)).to(grad_bias.dtype)
        return grad_direction, grad_bias, *([None] * len(saved))  # a states and a mask per group: no gradient


class RidgeValueHead(nn.Module):
    """V(x) = mean + std * w^T z(x): ridge regression on the standardised mean of the prompt states,
    z = (mean_l H_x[l] - mu) / sigma. Same call as :class:`ValueHead`; every number is a buffer
    (the closed-form fit of :func:`fit_value_head` fills them)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        for name, shape in (("feature_mean", (hidden_size,)), ("feature_scale", (hidden_size,)),
                            ("weight", (hidden_size,)), ("target_mean", ()), ("target_std", ()), ("alpha", ())):
            self.register_buffer(name, torch.zeros(shape) if name != "feature_scale" else torch.ones(shape))

    @_without_autocast
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


# Below this cross-validated R^2, V(x) is taken as no better than a constant: the run warns and records it.
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
    """How good V(x) is, from k-fold cross-validation over the validation prompts (nested: the figure for
    a fold comes from a head that never saw its prompts, its epoch count or penalty chosen without them
    too), and what the final head is: fit on every validation prompt with the chosen epoch count."""

    # attention head: the epoch count chosen by cross-validation, the final head's (0: initial); ridge: 0
    best_epoch: int
    cv_mse: float  # MSE of the out-of-fold predictions
    constant_mse: float  # MSE of predicting, on each fold, the mean of the other folds' targets
    cv_r2: float  # 1 - cv_mse / constant_mse: an unbiased estimate of V(x)'s R^2 on new prompts
    cv_spearman: float  # rank correlation of the out-of-fold predictions with the realised rewards
    folds: int
    n_fit: int  # prompts the final head is fit on: every validation prompt
    insample_r2: float  # the final head on the prompts it was fit on (optimistic)
    target_mean: float
    target_std: float
    fit_seconds: float = 0.0
    head: str = "attention"
    ridge_alpha: float | None = None  # the final head's penalty, chosen by leave-one-out error over all prompts
    # attention head: the pooled out-of-fold R^2 at best_epoch, an epoch chosen on those very predictions
    # (optimistic, for comparison with cv_r2), and each fold's epoch count chosen on the other folds
    selected_r2: float | None = None
    fold_epochs: list[int] | None = None

    @property
    def informative(self) -> bool:
        return math.isfinite(self.cv_r2) and self.cv_r2 >= INFORMATIVE_R2

    def as_dict(self) -> dict:
        return {**self.__dict__, "informative": self.informative}


@dataclass
class ValueFitSettings:
    epochs: int = 20
    learning_rate: float = 1e-3
    batch_size: int = 32
    folds: int = 5
    dropout: float = 0.1
    seed: int = 0
    head: str = "attention"  # or "ridge" (:class:`RidgeValueHead`)


# The nested cross-validation needs a non-empty training part without two folds.
MIN_VALUE_PROMPTS = 3


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
    """The fold of each of ``n`` prompts: a seeded permutation dealt round-robin into ``min(folds, n)`` folds."""
    if n < MIN_VALUE_PROMPTS:
        raise ValueError(f"the value head needs at least {MIN_VALUE_PROMPTS} validation prompts, got {n}")
    if folds < 3:
        raise ValueError(f"the value head's cross-validation needs at least 3 folds, got {folds}")
    fold = np.empty(n, dtype=np.int64)
    fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % min(folds, n)
    return fold


@torch.no_grad()
def predict(head: nn.Module, states: list[torch.Tensor], batch_size: int = 64) -> np.ndarray:
    """V(x) of each prompt's states ([L_i, H]), ``batch_size`` prompts at a time, in eval mode."""
    head.eval()
    values = []
    for start in range(0, len(states), batch_size):
        rows = states[start:start + batch_size]
        values.append((head.forward_rows(rows) if isinstance(head, ValueHead) else head(*pad_states(rows))).float())
    return torch.cat(values).cpu().numpy() if values else np.zeros(0)


# the initial heads are drawn from torch's global generator: one fit at a time
_INITIALISING = threading.Lock()


def new_fit_head(states: list[torch.Tensor], targets: torch.Tensor, train_idx: np.ndarray, settings: ValueFitSettings,
                 fit_id: int) -> tuple[ValueHead, np.random.Generator]:
    """A fit's initial head (seeded by ``fit_id``, its output scaled to the targets of ``train_idx``), on the
    states' device, with its own stream of dropout draws (numpy's on CPU, the device's generator elsewhere),
    and the fit's stream for its batch order."""
    device = states[0].device
    seed = settings.seed * 7919 + fit_id
    with _INITIALISING:
        torch.manual_seed(seed)
        head = ValueHead(states[0].shape[-1], dropout=settings.dropout)
    head.generator = (np.random.default_rng([settings.seed, fit_id, 1]) if device.type == "cpu"
                      else torch.Generator(device=device).manual_seed(seed))
    rng = np.random.default_rng([settings.seed, fit_id])
    part = targets[torch.as_tensor(train_idx)]
    head.target_mean.fill_(part.mean())
    head.target_std.fill_(part.std(unbiased=False).clamp(min=1e-6))
    return head.to(device), rng


def _padded_groups(states: list[torch.Tensor], rows) -> tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``rows`` (indices into ``states``) in groups of similar length (:data:`GROUP_PADDING`), padded: the
    positions in ``rows`` in the groups' order (by length), and the groups (states [b, L, H], mask [b, L])."""
    rows = np.asarray(rows, dtype=np.int64)
    groups = padding_bounded_groups([states[i].shape[0] for i in rows], max_padding=GROUP_PADDING)
    order = np.asarray([i for group in groups for i in group], dtype=np.int64)
    return order, [pad_states([states[i] for i in rows[group]]) for group in groups]


def train_attention_head(states: list[torch.Tensor], targets: torch.Tensor, train_idx: np.ndarray,
                         watched: list[np.ndarray], epochs: int, settings: ValueFitSettings,
                         fit_id: int = 0, enough: Callable[[int, ValueHead], bool] | None = None
                         ) -> tuple[ValueHead, list[np.ndarray]]:
    """One attention head trained on ``train_idx`` for ``epochs`` epochs (targets standardised on them);
    returns it and, for each index set in ``watched``, its predictions after every epoch, [epochs + 1, n]
    (row 0: the initial head). ``fit_id`` seeds this fit's initialisation, order and dropout. ``enough``
    (optional) is asked before each epoch, with the epochs done and the head; training stops when it says
    True. An epoch does not depend on how many follow it: stopped after e epochs, the head is the one trained
    for e.

    Each batch is pooled in padded groups of similar length. The watched sets are padded once and predicted
    in one pass after each epoch; when one batch holds every training row (``batch_size`` >= their number),
    its groups are padded once too: every epoch is then the same full-batch step, which does not depend on
    the rows' order, only on its own dropout draws."""
    device = states[0].device
    head, rng = new_fit_head(states, targets, train_idx, settings, fit_id)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=0.0,
                                  **({"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}))
    targets_d = targets.to(device)
    seen_idx = np.concatenate(watched) if watched else np.zeros(0, dtype=np.int64)
    seen_order, seen = _padded_groups(states, seen_idx)
    bounds = np.cumsum([len(idx) for idx in watched])[:-1]

    def predictions() -> np.ndarray:  # V(x) on every watched row, in the order of ``watched``
        head.eval()
        out = np.zeros(len(seen_idx))
        if seen:
            with torch.no_grad():
                out[seen_order] = head.forward_padded(seen).float().cpu().numpy()
        return out

    # one batch holds every training row: its groups, padded once
    whole = _padded_groups(states, train_idx) if len(train_idx) <= settings.batch_size else None
    curve = [predictions()]
    for done in range(epochs):
        if enough is not None and enough(done, head):
            break
        head.train()
        order = train_idx if whole else rng.permutation(train_idx)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            positions, groups = whole or _padded_groups(states, batch)
            values = head.forward_padded(groups)
            rows = torch.as_tensor(np.asarray(batch)[positions], device=device)
            loss = torch.nn.functional.mse_loss(values, targets_d[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append(predictions())
    return head, np.split(np.stack(curve), bounds, axis=1) if watched else []


def _cv_figures(predictions: np.ndarray, targets: np.ndarray, fold: np.ndarray) -> tuple[float, float, float, float]:
    """``(mse, constant_mse, r2, spearman)`` of out-of-fold ``predictions``; the constant predicts, on each
    fold, the mean of the other folds' targets (what a constant fit without the fold would say)."""
    constant = np.array([targets[fold != fold[i]].mean() for i in range(len(targets))])
    sse, baseline = float(np.sum((targets - predictions) ** 2)), float(np.sum((targets - constant) ** 2))
    r2 = 1.0 - sse / baseline if baseline > 0 else float("nan")
    return sse / len(targets), baseline / len(targets), r2, spearman(predictions, targets)


def select_epochs(judged_errors: np.ndarray, inner_errors: np.ndarray) -> tuple[list[int], int]:
    """``(fold_epochs, best_epoch)``. ``judged_errors`` [k, epochs + 1]: fold f's squared error after each
    epoch under the head that predicts it (trained without f); ``inner_errors`` [k, epochs + 1]: for fold
    f, the summed error after each epoch of heads that never saw f, on folds other than f. Fold f's epoch
    count minimises its ``inner_errors`` row (f's targets neither train nor select it); the final one
    minimises the sum of ``judged_errors`` over the folds. Ties: the fewest epochs."""
    return [int(np.argmin(row)) for row in inner_errors], int(np.argmin(judged_errors.sum(axis=0)))


# The fit's version: changed whenever the same inputs give other numbers (2: the dropout's own draws and layout;
# 3: V(x) without dropout through the reassociated output, :meth:`ValueHead._value`; 4: V(x) without dropout or
# gradients from one product of the states, :meth:`ValueHead._values_without_grad`; 5: dropout masks from 8-bit
# draws, :func:`bernoulli_mask`; 6: fit to targets from pi_ref's validation generation, on the prompt states of that
# generation's prefill, :meth:`lolrl.engine.stages.ReferenceStages._value_features`), so that a cached value head
# of another version is recomputed (the reference-pass cache's key carries it).
FIT_VERSION = 6

# The cross-validation's fits (the pair fits, then the final one) run side by side in this many threads (None: on
# CPU as many as torch's intra-op threads, each fit then on one, see :func:`_one_cpu_thread`; on an accelerator
# one). Each fit draws from its own generators, so the result does not depend on it.
FIT_THREADS: int | None = None

# The final head starts after the pair fits, on the first thread they leave idle (5 pair fits on 2 threads: the
# third round's idle one), and trains ahead of the choice of its epoch count, keeping a copy of its parameters
# after each epoch while the copies fit in this many bytes (~4 MB each for a 512-wide head; ~270 MB for a 4096-wide
# one: none, it waits). The selected epoch's copy is then taken: the same head, bit for bit, as trained after.
# On one thread (an accelerator's default) it starts after the choice and keeps no copy.
FINAL_AHEAD_BYTES = 256 * 2**20


def fit_value_head(states: list[torch.Tensor], targets: list[float],
                   settings: ValueFitSettings | None = None,
                   device: torch.device | str | None = None) -> tuple[nn.Module, ValueFitReport]:
    """Fit V on (prompt states, reward of pi_ref's generation) with ``settings.head`` and report it by
    k-fold cross-validation (``settings.folds`` folds, ``settings.seed``); the returned head is fit on
    every prompt.

    Attention head: for every neighbour pair of folds {f, f + 1 mod k} a head trained without both
    predicts both after each epoch. Fold f is predicted by the head without {f, f + 1}, at the epoch
    count that minimises the error of the two heads that never saw f on their other fold ({f - 1, f} on
    f - 1, {f, f + 1} on f + 1; :func:`select_epochs`): f's targets neither train nor select what is
    scored on f. The figure is that of a head fit on (k - 2) / k of the prompts (conservative for the
    final head's). The final epoch count minimises the error of all folds' out-of-fold predictions, and
    the final head is trained on every prompt for that many epochs (in the pair fits' pool, ahead of that
    choice where a thread is idle: :data:`FINAL_AHEAD_BYTES`). k + 1 small fits in all (6 for k = 5; issue
    22's fold heads plus every pair of folds took 16).

    The fit runs on ``device`` (default: where the states are), in the head's float32 whatever the caller's
    autocast (:func:`_without_autocast`). The head's attention costs O(heads x hidden) per prompt token
    (:meth:`ValueHead.pool`). ``settings``: default ``ValueFitSettings()``."""
    settings = settings if settings is not None else ValueFitSettings()
    if settings.head == "ridge":
        return fit_ridge_value_head(states, targets, settings)
    make_value_head(settings.head, 1)  # a clear error for an unknown kind
    device = torch.device(device) if device is not None else states[0].device
    threads = FIT_THREADS or (torch.get_num_threads() if device.type == "cpu" else 1)
    with _one_cpu_thread(device):
        return _fit_attention_head(states, targets, settings, device, threads)



@contextmanager
def _one_cpu_thread(device: torch.device):
    """On CPU, one intra-op thread while the head is fit: its operations are small ([batch, prompt, hidden]),
    so threads gain little, and on a shared machine each operation's thread barrier waits for a descheduled
    thread (measured on 2 busy cores: 140-300 ms a training step with 2 threads, 18 ms with one)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_attention_head(states: list[torch.Tensor], targets: list[float], settings: ValueFitSettings,
                        device: torch.device, threads: int = 1) -> tuple[ValueHead, ValueFitReport]:
    started = time.perf_counter()
    states = [s.to(device) for s in states]
    n = len(states)
    fold = fold_assignment(n, settings.folds, settings.seed)
    k = int(fold.max()) + 1
    y = np.asarray(targets, dtype=np.float64)
    targets_t = torch.tensor(targets, dtype=torch.float32)
    members = [np.flatnonzero(fold == f) for f in range(k)]
    progress = tqdm(total=k + 1, desc="value head (cross-validated)", leave=False)
    judged = [None] * k  # judged[f]: [epochs + 1, |f|] predictions on f of the head without {f, f + 1}
    inner_errors = np.zeros((k, settings.epochs + 1))  # inner_errors[f]: SSE per epoch of heads without f, not on f

    def pair_fit(f: int) -> list[np.ndarray]:  # the head without the neighbour pair {f, f + 1 mod k}
        g = (f + 1) % k
        _, curves = train_attention_head(states, targets_t, np.flatnonzero((fold != f) & (fold != g)),
                                         [members[f], members[g]], settings.epochs, settings, fit_id=1 + f)
        progress.update(1)
        return curves

    chosen = Future()  # the final head's epoch count, once the pair fits are judged
    workers = max(1, min(threads, k + 1))
    ahead_bytes = FINAL_AHEAD_BYTES if workers > 1 else 0  # one thread: no idle one to run ahead on

    def final_fit() -> ValueHead:  # on every prompt, ahead of ``chosen`` while its copies fit in ahead_bytes
        copies, stopped = {}, []

        def enough(done: int, head: ValueHead) -> bool:
            if not chosen.done():
                state = head.state_dict()
                if (len(copies) + 1) * sum(t.numel() * t.element_size() for t in state.values()) <= ahead_bytes:
                    copies[done] = {name: t.detach().clone() for name, t in state.items()}
                    return False
            if done < chosen.result():  # waits for the pair fits
                return False
            stopped.append(done)
            return True

        head, _ = train_attention_head(states, targets_t, np.arange(n), [], settings.epochs, settings, fit_id=0,
                                       enough=enough)
        if (stopped[0] if stopped else settings.epochs) != chosen.result():  # trained past it while it was chosen
            head.load_state_dict(copies[chosen.result()])
        progress.update(1)
        return head

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pair_futures = [pool.submit(pair_fit, f) for f in range(k)]
        final_future = pool.submit(final_fit)  # after the pair fits: it takes the first thread they leave idle
        try:
            for f, future in enumerate(pair_futures):
                on_f, on_g = future.result()
                g = (f + 1) % k
                judged[f] = on_f
                inner_errors[f] += ((on_g - y[members[g]]) ** 2).sum(axis=1)
                inner_errors[g] += ((on_f - y[members[f]]) ** 2).sum(axis=1)
            judged_errors = np.stack([((judged[f] - y[members[f]]) ** 2).sum(axis=1) for f in range(k)])
            fold_epochs, best_epoch = select_epochs(judged_errors, inner_errors)
        except BaseException as error:
            for future in pair_futures + [final_future]:
                future.cancel()
            chosen.set_exception(error)  # a final fit waiting for its epoch count stops
            raise
        chosen.set_result(best_epoch)
        head = final_future.result()
    out_of_fold, selected = np.empty(n), np.empty(n)
    for f in range(k):
        out_of_fold[members[f]] = judged[f][fold_epochs[f]]
        selected[members[f]] = judged[f][best_epoch]
    progress.close()
    fitted = predict(head, states)
    head.cpu().eval()
    head.generator = None  # the fit's stream ends with it
    cv_mse, constant_mse, cv_r2, cv_spearman = _cv_figures(out_of_fold, y, fold)
    report = ValueFitReport(best_epoch=best_epoch, cv_mse=cv_mse, constant_mse=constant_mse, cv_r2=cv_r2,
                            cv_spearman=cv_spearman, folds=k, n_fit=n,
                            insample_r2=r_squared(fitted, y, float(y.mean())),
                            target_mean=float(head.target_mean), target_std=float(head.target_std),
                            fit_seconds=time.perf_counter() - started,
                            selected_r2=_cv_figures(selected, y, fold)[2], fold_epochs=fold_epochs)
    return head, report


# The ridge penalties tried (on standardised features and targets); the one with the lowest
# leave-one-out error on the prompts a head is fit on is kept.
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


def _ridge_head(features: np.ndarray, y: np.ndarray, rows: np.ndarray) -> tuple[RidgeValueHead, float]:
    """The ridge head fit on ``rows`` alone (their feature and target scaling, the penalty by their
    leave-one-out error); returns it and its penalty."""
    mean, std = float(y[rows].mean()), max(float(y[rows].std()), 1e-6)
    f_mean = features[rows].mean(0)
    f_scale = features[rows].std(0)
    f_scale[f_scale < 1e-6] = 1.0  # a feature constant on these rows: its weight comes out 0
    alpha, weights = _ridge_loo((features[rows] - f_mean) / f_scale, (y[rows] - mean) / std, RIDGE_ALPHAS)
    head = RidgeValueHead(features.shape[1])
    for name, value in (("feature_mean", f_mean), ("feature_scale", f_scale), ("weight", weights),
                        ("target_mean", mean), ("target_std", std), ("alpha", alpha)):
        getattr(head, name).copy_(torch.as_tensor(value, dtype=torch.float32))
    return head.eval(), alpha


def fit_ridge_value_head(states: list[torch.Tensor], targets: list[float],
                         settings: ValueFitSettings | None = None) -> tuple[RidgeValueHead, ValueFitReport]:
    """The closed-form alternative to the attention head: ridge regression of the standardised targets
    on the standardised mean-pooled prompt states. Reported by k-fold cross-validation (each fold
    predicted by a ridge fit on the other folds, its penalty chosen by their leave-one-out error); the
    returned head is fit on every prompt, its penalty by leave-one-out error over all of them."""
    settings = settings if settings is not None else ValueFitSettings()
    started = time.perf_counter()
    states = [s.cpu() for s in states]
    features = torch.stack([s.double().mean(0) for s in states]).numpy()
    y = np.asarray(targets, dtype=np.float64)
    fold = fold_assignment(len(states), settings.folds, settings.seed)
    out_of_fold = np.empty(len(states))
    for f in range(int(fold.max()) + 1):
        fold_head, _ = _ridge_head(features, y, np.flatnonzero(fold != f))
        out_of_fold[fold == f] = predict(fold_head, [states[i] for i in np.flatnonzero(fold == f)])
    head, alpha = _ridge_head(features, y, np.arange(len(states)))
    cv_mse, constant_mse, cv_r2, cv_spearman = _cv_figures(out_of_fold, y, fold)
    report = ValueFitReport(best_epoch=0, cv_mse=cv_mse, constant_mse=constant_mse, cv_r2=cv_r2,
                            cv_spearman=cv_spearman, folds=int(fold.max()) + 1, n_fit=len(states),
                            insample_r2=r_squared(predict(head, states), y, float(y.mean())),
                            target_mean=float(head.target_mean), target_std=float(head.target_std),
                            fit_seconds=time.perf_counter() - started, head="ridge", ridge_alpha=alpha)
    return head, report
