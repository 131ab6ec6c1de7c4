"""The two contrastive objectives ScaleGrad is compared with, in pure torch
(``docs/objectives.md``).

* The contrastive-token loss (CT; Jiang, Zhang, van Noord and Kanoulas, 2022, *A Simple
  Contrastive Learning Objective for Alleviating Neural Text Degeneration*):
  :func:`contrastive_token_loss`, with the semantics and argument names of the
  ``ct-loss`` package (version 0.0.3). At a scored position ``t`` of the first
  ``ct_length`` positions, the negatives are the targets of the ``preced_m_negatives``
  positions before ``t`` (duplicates kept; padding and the target's own id left out)::

      ct_t = log(1 + sum_{n in N_t} exp(z_t[n] - z_t[y_t]))

  on the raw logits ``z``, averaged over the non-padding positions. The paper trains
  with ``loss = CE + CT``.

* SimCTG's contrastive loss (Su, Lan, Wang, Yogatama, Kong and Collier, 2022, *A
  Contrastive Framework for Neural Text Generation*): :func:`simctg_loss` is ``CE +
  CL`` where, with ``s_ij`` the cosine similarity of the last hidden states at
  positions ``i`` and ``j`` of a row::

      CL = sum_{i != j, both real tokens} max(0, rho - (s_ii - s_ij)) / #pairs

  as the ``simctg`` package's (version 0.7) ``SimCTGLoss`` computes it.

Neither builds what it does not need: CT gathers ``(batch, time, window)`` logits (no
``(batch, time, time)`` tensor, no dense negative mask); SimCTG builds one
``(batch, time, time)`` similarity matrix, which its backward pass reuses in place.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["contrastive_token_loss", "ct_window", "check_ct_argument", "simctg_loss",
           "simctg_contrastive_loss", "check_margin"]

Number = Union[int, float]


# --------------------------------------------------------------------------- #
# Contrastive-token loss
# --------------------------------------------------------------------------- #

def check_ct_argument(value: Number, name: str) -> Number:
    """``ct_length`` / ``preced_m_negatives`` must be finite numbers > 0 (a fraction in
    (0, 1], or an absolute count > 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number > 0 (a fraction in (0, 1] or an absolute "
                         f"count > 1), got {value!r}")
    return value


def ct_window(time: int, ct_length: Number = 0.25, preced_m_negatives: Number = 0.5):
    """``(positions, negatives)``: how many leading positions of a row of ``time``
    positions CT scores, and how many preceding targets each takes as negatives.

    As ``ct-loss``: a value ``<= 1`` is a fraction (``ct_length`` of ``time``,
    ``preced_m_negatives`` of the CT length, before it is cut to ``time``), a value ``>
    1`` an absolute count, both rounded with Python's ``round`` (halves to even)."""
    ct_length = check_ct_argument(ct_length, "ct_length")
    preced_m_negatives = check_ct_argument(preced_m_negatives, "preced_m_negatives")
    length = round(time * ct_length) if ct_length <= 1 else round(ct_length)
    if preced_m_negatives <= 1:
        negatives = round(preced_m_negatives * length)
    else:
        negatives = round(preced_m_negatives)
    return min(length, time), negatives


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def contrastive_token_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -100,
    pad_id: Optional[int] = 0,
    ct_length: Number = 0.25,
    preced_m_negatives: Number = 0.5,
) -> torch.Tensor:
    """The contrastive-token term (``ct-loss``'s ``contrastive_token_loss``), a scalar.

    Args:
        logits: ``(batch, time, vocab)`` raw scores, aligned with ``target`` (position
            ``t`` predicts ``target[:, t]``). Any float dtype; computed in float32
            (float64 stays float64).
        target: ``(batch, time)`` token ids.
        ignore_index: target id of positions that are neither scored nor negatives.
        pad_id: the padding id: targets equal to it are neither scored nor negatives
            (``ct-loss``'s ``pad_id``, 0 by default as there; pass your tokenizer's);
            ``None``: no id is padding, only ``ignore_index`` positions are left out.
        ct_length: the leading positions of each row that CT scores: a fraction of
            ``time`` (``<= 1``) or a count (``> 1``).
        preced_m_negatives: how many preceding targets are each position's negatives:
            a fraction of the CT length (``<= 1``) or a count (``> 1``).

    Returns the sum of the per-position terms over the scored (non-padding) positions of
    the first ``ct_length`` positions, divided by their number, in the whole batch; the
    papers' training loss is cross-entropy plus this. Where ``ct-loss`` fails, this
    returns 0 (with a gradient of zeros): a window that rounds to 0 negatives (``ct-loss``
    crashes) and a batch without a scored position (``ct-loss`` returns NaN).
    """
    if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
        raise ValueError("expected logits (batch, time, vocab) and target (batch, time), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    length, negatives = ct_window(target.size(1), ct_length, preced_m_negatives)
    logits, target = logits[:, :length], target[:, :length].long()
    valid = target != ignore_index
    if pad_id is not None:
        valid &= target != pad_id
    window = min(negatives, length - 1)
    count = valid.sum()
    if window <= 0 or not bool(count):
        return logits.sum() * 0.0
    safe = target.masked_fill(~valid, 0)
    # negative_ids[b, t, k] = target[b, t - window + k]: the `window` targets before t.
    negative_ids = F.pad(safe, (window, 0)).unfold(1, window, 1)[:, :length]
    negative_ok = F.pad(valid, (window, 0), value=False).unfold(1, window, 1)[:, :length]
    negative_ok = negative_ok & (negative_ids != safe.unsqueeze(2))
    dtype = _compute_dtype(logits)
    positive = logits.gather(2, safe.unsqueeze(2)).to(dtype)
    difference = (logits.gather(2, negative_ids).to(dtype) - positive)
    difference = difference.masked_fill(~negative_ok, -math.inf)
    # log(1 + sum exp(d)), stable: shift by max(0, max d) (a constant for autograd).
    shift = difference.amax(dim=2).clamp(min=0.0).detach()
    terms = shift + torch.log(torch.exp(-shift) +
                              torch.exp(difference - shift.unsqueeze(2)).sum(dim=2))
    return terms.masked_fill(~valid, 0.0).sum() / count


# --------------------------------------------------------------------------- #
# SimCTG
# --------------------------------------------------------------------------- #

def check_margin(margin: float, *, name: str = "margin") -> float:
    """SimCTG's margin ``rho`` must be a finite number >= 0 (the paper: 0.5)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or \
            not math.isfinite(margin) or margin < 0:
        raise ValueError(f"{name} must be a number >= 0 (SimCTG's rho; the paper uses 0.5), "
                         f"got {margin!r}")
    return float(margin)


class _MarginSum(torch.autograd.Function):
    """``sum_{b, i != j, valid} max(0, margin - s_ii + s_ij)`` of ``s = n n^T`` for unit
    rows ``n (batch, time, dim)``, with one ``(batch, time, time)`` matrix: forward fills
    it with the hinge values (kept for backward), backward turns it into ``dL/ds`` in
    place."""

    @staticmethod
    def forward(ctx, normed, valid, margin):
        scores = torch.bmm(normed, normed.transpose(1, 2))
        gold = scores.diagonal(dim1=1, dim2=2).clone()
        hinge = scores.sub_(gold.unsqueeze(2)).add_(margin).clamp_(min=0.0)
        if valid is not None:
            hinge.masked_fill_(~valid.unsqueeze(1), 0.0).masked_fill_(~valid.unsqueeze(2), 0.0)
        hinge.diagonal(dim1=1, dim2=2).zero_()
        total = hinge.sum()
        ctx.hinge = hinge  # on ctx, not saved: backward overwrites it in place
        ctx.save_for_backward(normed)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (normed,) = ctx.saved_tensors
        hinge, ctx.hinge = ctx.hinge, None
        if hinge is None:
            raise RuntimeError("simctg_loss: a second backward pass through the same graph "
                               "is not supported (retain_graph=True)")
        # d/ds_ij = [hinge_ij > 0] (i != j); s_ii enters every term of row i with -1.
        grad_scores = hinge.sign_().mul_(grad_total)
        grad_scores.diagonal(dim1=1, dim2=2).copy_(-grad_scores.sum(dim=2))
        grad = torch.bmm(grad_scores, normed) + torch.bmm(grad_scores.transpose(1, 2), normed)
        return grad, None, None


def simctg_contrastive_loss(
    hidden_states: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    *,
    margin: float = 0.5,
) -> torch.Tensor:
    """SimCTG's contrastive term ``CL`` (``SimCTGLoss.contrastive_loss``), a scalar.

    ``hidden_states (batch, time, dim)``: the last hidden states; ``valid (batch,
    time)`` bool: which positions are real tokens (``None``: all). The pairs ``(i, j)``,
    ``i != j``, of real tokens of a row are scored; the sum is divided by their number
    in the batch (0 when there is none, where ``simctg`` gives NaN).

    ``simctg`` marks a row's first ``k`` positions real, ``k`` its number of
    non-padding tokens; with its right padding that is the same mask. Here the
    positions themselves are masked, so left or inner padding is masked right too.
    """
    margin = check_margin(margin)
    if hidden_states.dim() != 3:
        raise ValueError(f"expected hidden_states (batch, time, dim), got "
                         f"{tuple(hidden_states.shape)}")
    if valid is not None and tuple(valid.shape) != tuple(hidden_states.shape[:2]):
        raise ValueError(f"valid of shape {tuple(valid.shape)} does not match hidden_states "
                         f"of shape {tuple(hidden_states.shape)}")
    hidden = hidden_states.to(_compute_dtype(hidden_states))
    normed = hidden / hidden.norm(dim=2, keepdim=True)
    if valid is not None:
        valid = valid.to(device=hidden.device, dtype=torch.bool)
        lengths = valid.sum(dim=1)
    else:
        lengths = torch.full((hidden.size(0),), hidden.size(1), device=hidden.device)
    pairs = (lengths * (lengths - 1)).sum()
    total = _MarginSum.apply(normed, valid, margin)
    return total / pairs.clamp(min=1).to(total.dtype)


def simctg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    hidden_states: torch.Tensor,
    *,
    margin: float = 0.5,
    ignore_index: int = -100,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SimCTG's training loss ``CE + CL`` (``SimCTGLoss``'s ``mle_loss + cl_loss``).

    Args:
        logits: ``(batch, time, vocab)``, aligned with ``target``.
        target: ``(batch, time)`` ids; ``ignore_index`` ones are not scored by CE.
        hidden_states: ``(batch, time, dim)`` last hidden states of the positions whose
            logits these are (``outputs.hidden_states[-1]`` of a Hugging Face model).
        margin: ``rho`` (0.5 in the paper), >= 0.
        valid: ``(batch, time)`` bool, the positions that are real tokens for ``CL``;
            default ``target != ignore_index`` (with ``simctg``'s data, inputs and
            labels are padded at the same positions).

    CE is the mean over the scored targets (``torch.nn.CrossEntropyLoss``), ``CL``
    :func:`simctg_contrastive_loss`.
    """
    if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
        raise ValueError("expected logits (batch, time, vocab) and target (batch, time), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if tuple(hidden_states.shape[:2]) != tuple(target.shape):
        raise ValueError(f"hidden_states of shape {tuple(hidden_states.shape)} do not match "
                         f"target of shape {tuple(target.shape)}")
    if valid is None:
        valid = target != ignore_index
    scored = (target != ignore_index).sum()
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).to(_compute_dtype(logits)),
                          target.reshape(-1).long(), ignore_index=ignore_index, reduction="sum")
    return nll / scored.clamp(min=1) + simctg_contrastive_loss(hidden_states, valid,
                                                               margin=margin)
