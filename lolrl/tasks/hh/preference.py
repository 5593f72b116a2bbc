"""Preference accuracy of a policy on held-out pairs: does it rank the higher-reward response first?

Two measures, on summed response log-probabilities (EOS included):

* ``implicit_accuracy``: how often the policy's log-ratio to the reference ranks the chosen
  response above the rejected one,
  :math:`[\\log\\pi_\\theta(y_c) - \\log\\pi_{ref}(y_c)] > [\\log\\pi_\\theta(y_r) - \\log\\pi_{ref}(y_r)]`
  (DPO's implicit reward; ties count as half);
* ``likelihood_accuracy``: reference-free, how often :math:`\\log\\pi_\\theta(y_c) > \\log\\pi_\\theta(y_r)`,
  with the mean margin, also per token (length-normalised).
"""
from __future__ import annotations

import numpy as np

from lolrl.engine.collation import Collator, Tokenizer
from lolrl.engine.data import DataError, Record
from lolrl.engine.reference import reference_pass
from lolrl.tasks.hh.data import render, row_location

PAIR_ORDERS = ("reward", "first")


def ordered_pair(row: dict, order: str = "reward", name: str = "pairs", index: int = 0) -> tuple[str, str] | None:
    """(chosen, rejected) of a PRO-format row's first two suffixes: the higher stored reward first
    (``None`` on a tie: no preference), or as they stand (``order="first"``). A row with one suffix
    is refused, naming its file and line (``name`` and ``index`` for a row built in memory)."""
    if order not in PAIR_ORDERS:
        raise ValueError(f"unknown pair order '{order}' (expected one of {', '.join(PAIR_ORDERS)})")
    if len(row["suffix"]) < 2:
        raise DataError(*row_location(row, name, index), "suffix",
                        f"a preference pair needs 2 suffixes, the record has {len(row['suffix'])}")
    (a, b), (ra, rb) = row["suffix"][:2], row["reward"][:2]
    if order == "first":
        return a, b
    if ra == rb:
        return None
    return (b, a) if rb > ra else (a, b)


def pair_records(rows: list[dict], how: str = "llama") -> tuple[list[Record], list[Record]]:
    """Chosen (higher stored reward) and rejected records of PRO-format rows; ties are skipped."""
    chosen, rejected = [], []
    for i, row in enumerate(rows):
        pair = ordered_pair(row, name="pairs", index=i)
        if pair is None:
            continue
        a, b = pair
        prompt = render(row["prefix"][0], how)
        chosen.append(Record(id=f"pair-{i}-chosen", prompt=prompt, response=a))
        rejected.append(Record(id=f"pair-{i}-rejected", prompt=prompt, response=b))
    return chosen, rejected


def response_logprob_sums(model, tokenizer, records: list[Record], batch_size: int = 8,
                          max_prompt_length: int = 640, max_response_length: int = 128, desc: str = "log-probs"):
    """Summed log-prob and token count of each record's response under ``model``."""
    rows = Tokenizer(tokenizer, False, max_prompt_length, max_response_length)(records)  # causal LMs
    outputs = reference_pass(model, rows, Collator(tokenizer.pad_token_id, False), batch_size, desc=desc)
    return (np.array([float(lp.sum()) for lp in outputs.logprobs]),
            np.array([len(lp) for lp in outputs.logprobs], dtype=np.float64))


def preference_report(policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None,
                      chosen_tokens=None, rejected_tokens=None) -> dict:
    """The accuracies and margins above from per-pair summed log-probs (numpy arrays)."""
    policy_chosen, policy_rejected = np.asarray(policy_chosen), np.asarray(policy_rejected)
    margin = policy_chosen - policy_rejected
    report = {"pairs": int(margin.size), "likelihood_accuracy": _accuracy(margin),
              "likelihood_margin": float(margin.mean())}
    if chosen_tokens is not None:
        per_token = policy_chosen / chosen_tokens - policy_rejected / rejected_tokens
        report.update(likelihood_accuracy_per_token=_accuracy(per_token), likelihood_margin_per_token=float(
            per_token.mean()))
    if ref_chosen is not None:
        implicit = margin - (np.asarray(ref_chosen) - np.asarray(ref_rejected))
        report.update(implicit_accuracy=_accuracy(implicit), implicit_margin=float(implicit.mean()))
    return report


def _accuracy(margins: np.ndarray) -> float:
    return float(np.mean((margins > 0) + 0.5 * (margins == 0)))
