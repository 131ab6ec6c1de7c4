"""Unlikelihood training (Welleck et al., 2019), in pure torch.

Two losses push probability away from *candidates*, tokens the model should
not produce at a position:

* token level (:func:`candidate_penalty_loss`): the candidates at position
  ``t`` are the previous targets minus the current target, and each adds
  ``-log(clamp(1 - p_t(c), min=1e-5))``;
* sequence level (:func:`sequence_penalty_loss`): on a greedy continuation of
  a prefix, every generated token that belongs to an N-gram already generated
  earlier (:func:`ngram_repeat_mask`) adds ``-log(clamp(1 - p(token),
  min=1e-20))``.

Quirks of the original fairseq module, reproduced by default:

* the token-level loss flattens the whole batch into one sequence, so the
  candidates of a row include the targets of the rows before it;
  ``row_length=`` builds them within each row instead;
* there the padding id is a candidate at every position (the original fills
  the not-yet-seen part of its ``(N, N)`` candidate triangle with the padding
  id, ``pad * pad`` to be exact, which is ``pad`` for fairseq's ``pad = 1``),
  and positions whose target is padding are penalised like any other;
  ``ignore_padding=True`` drops both;
* :func:`ngram_repeat_mask` never checks the last N-gram of a continuation;
  ``check_last=True`` checks it.

Nothing here builds the original's dense ``(N, N)`` candidate triangle or a
dense ``(N, V)`` candidate mask: the candidates are a list of
``(position, token)`` pairs, as long as the number of distinct previous
targets summed over the positions.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .arguments import require_tensor

__all__ = [
    "CandidatePenaltyLoss",
    "candidate_penalty_loss",
    "candidate_pairs",
    "ngram_repeat_mask",
    "sequence_penalty_loss",
]

TOKEN_CLAMP = 1e-5
SEQUENCE_CLAMP = 1e-20


class CandidatePenaltyLoss(NamedTuple):
    """Summed NLL of the targets and summed (unweighted) candidate penalty;
    the training loss is ``nll + alpha * penalty``."""

    nll: torch.Tensor
    penalty: torch.Tensor

    def total(self, alpha: float) -> torch.Tensor:
        return self.nll + alpha * self.penalty


def _first_occurrences(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(R, L)`` bool: True where ``rows[r, j]`` is the first valid occurrence
    of its id in row ``r``. A stable sort by id keeps equal ids in order of
    position, so a position is first when its sorted predecessor differs."""
    lowest = torch.iinfo(rows.dtype).min
    key = torch.where(valid, rows, torch.full_like(rows, lowest))
    sorted_ids, order = torch.sort(key, dim=1, stable=True)
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = torch.empty_like(first_sorted)
    first.scatter_(1, order, first_sorted)
    return first & valid


def candidate_pairs(
    target: torch.Tensor,
    *,
    padding_idx: int,
    row_length: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(position, candidate)`` pairs of the token-level loss.

    ``target`` is ``(N,)``; the context of position ``i`` is the targets
    before it in the same row (``row_length`` consecutive positions form a
    row; ``None``: one row of ``N``). The candidates of ``i`` are the distinct
    non-padding ids of its context other than ``target[i]``. Returns two
    ``(P,)`` long tensors (positions, candidate ids), each candidate once per
    position. Padding is left out here; :func:`candidate_penalty_loss` adds
    the original's padding candidate itself.
    """
    target = target.reshape(-1).long()
    n = target.numel()
    if row_length is None or n == 0:
        row_length = max(n, 1)
    if row_length <= 0 or n % row_length:
        raise ValueError(f"row_length={row_length} does not divide the {n} positions")
    rows = target.view(-1, row_length)
    first = _first_occurrences(rows, rows != padding_idx).reshape(-1)

    # first_before[i]: first occurrences at flat positions < i.
    first_before = torch.cumsum(first.long(), 0) - first.long()
    row_start = torch.arange(n, device=target.device) // row_length * row_length
    start = first_before[row_start]             # index of the row's first entry in `firsts`
    count = first_before - start                # distinct ids seen before i in its row
    firsts = torch.nonzero(first).squeeze(1)     # flat positions of first occurrences

    positions = torch.repeat_interleave(torch.arange(n, device=target.device), count)
    offsets = torch.cumsum(count, 0) - count
    k = torch.arange(positions.numel(), device=target.device) - offsets[positions]
    candidates = target[firsts[start[positions] + k]]
    keep = candidates != target[positions]
    return positions[keep], candidates[keep]


def candidate_penalty_loss(
    lprobs: torch.Tensor,
    target: torch.Tensor,
    *,
    padding_idx: int,
    row_length: Optional[int] = None,
    ignore_padding: bool = False,
) -> CandidatePenaltyLoss:
    """Token-level unlikelihood: ``(nll_sum, penalty_sum)``.

    Args:
        lprobs: ``(N, V)`` log-probabilities (the batch flattened row-major).
        target: ``(N,)`` target ids.
        padding_idx: the padding id; padding targets are never scored by the NLL.
        row_length: ``None`` (default, the original): the ``N`` positions are one
            sequence, so candidates cross row boundaries. An int ``T``: rows of
            ``T`` consecutive positions, candidates within each row only.
        ignore_padding: ``False`` (the original): the padding id is a candidate
            at every position, and positions with a padding target are
            penalised too. ``True``: neither.

    ``penalty_sum`` is the sum over positions and candidates ``c`` of
    ``-log(clamp(1 - p(c), min=1e-5))``; the training loss is
    ``nll_sum + alpha * penalty_sum`` (:meth:`CandidatePenaltyLoss.total`).
    """
    require_tensor(lprobs, "lprobs", "candidate_penalty_loss", "(N, V)")
    require_tensor(target, "target", "candidate_penalty_loss", "(N,)")
    if lprobs.dim() != 2 or target.numel() != lprobs.size(0):
        raise ValueError(
            f"expected lprobs (N, V) and target (N,), got {tuple(lprobs.shape)} "
            f"and {tuple(target.shape)}"
        )
    target = target.reshape(-1).long()
    n, vocab = lprobs.shape
    valid = target != padding_idx
    positions, candidates = candidate_pairs(target, padding_idx=padding_idx, row_length=row_length)
    if ignore_padding:
        scored = valid[positions]
        positions, candidates = positions[scored], candidates[scored]
    # One gather for the targets, the candidates and (the original) the padding
    # candidate at every position: its backward builds a single (N, V) buffer.
    rows = torch.arange(n, device=target.device)
    index = [rows * vocab + target, positions * vocab + candidates]
    if not ignore_padding:
        index.append(rows * vocab + padding_idx)
    gathered = lprobs.reshape(-1).take(torch.cat(index))
    target_lprobs, candidate_lprobs = gathered[:n], gathered[n:]
    nll = -(target_lprobs.masked_fill(~valid, 0.0)).sum()
    one_minus_p = torch.clamp(1.0 - candidate_lprobs.exp(), min=TOKEN_CLAMP)
    penalty = -torch.log(one_minus_p).sum()
    return CandidatePenaltyLoss(nll, penalty)


def ngram_repeat_mask(tokens: torch.Tensor, n: int, *, check_last: bool = False) -> torch.Tensor:
    """``(B, T)`` bool: the tokens of every N-gram that already occurred
    earlier in the same row (all ``n`` of its tokens are marked).

    Quirk of the original, kept by default: the N-gram starting at ``T - n``
    (the last one) is never checked; ``check_last=True`` checks it.
    """
    require_tensor(tokens, "tokens", "ngram_repeat_mask", "(B, T)")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if tokens.dim() != 2:
        raise ValueError(f"ngram_repeat_mask: tokens must be (B, T), got {tuple(tokens.shape)}")
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    length = tokens.size(1)
    last_start = length - n + 1 if check_last else length - n
    for i, row in enumerate(tokens.tolist()):
        seen = set()
        for j in range(max(last_start, 0)):
            gram = tuple(row[j : j + n])
            if gram in seen:
                mask[i, j : j + n] = True
            seen.add(gram)
    return mask.to(tokens.device)


def sequence_penalty_loss(
    lprobs: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sequence-level unlikelihood: the sum over marked tokens of
    ``-log(clamp(1 - p(token), min=1e-20))``.

    ``lprobs`` is ``(B, T, V)``, the log-probabilities under which ``tokens``
    ``(B, T)`` were generated; ``mask`` ``(B, T)`` marks the penalised tokens
    (bool or 0/1 floats).
    """
    for value, name, shape in ((lprobs, "lprobs", "(B, T, V)"), (tokens, "tokens", "(B, T)"),
                               (mask, "mask", "(B, T)")):
        require_tensor(value, name, "sequence_penalty_loss", shape)
    token_lprobs = lprobs.gather(2, tokens.long().unsqueeze(2)).squeeze(2)
    one_minus_p = torch.clamp(1.0 - token_lprobs.exp(), min=SEQUENCE_CLAMP)
    return (-torch.log(one_minus_p) * mask.to(one_minus_p.dtype)).sum()
