"""The ScaleGrad objective (Lin, Han and Joty, ICML 2021), in pure torch.

At position ``t`` the model's distribution ``p_t`` is rescaled so that every
*novel* token (one that does not occur among the previous targets
``y[0..t-1]`` of the same row) has its probability multiplied by ``gamma``:

    q_t(v) = (p_t(v) * s_t(v) + eps) / Z_t,   s_t(v) = gamma if v is novel else 1,
    Z_t    = sum_v (p_t(v) * s_t(v) + eps)

and the loss is ``-log q_t(y[t])``. The original code builds a dense
``(batch, time, vocab)`` novel mask and several dense copies of ``p``. Nothing
needs them: with ``S_t`` the set of distinct tokens already seen,

    Z_t = gamma * (1 - P_t) + P_t + V * eps,   P_t = sum_{v in S_t} p_t(v),

and ``P_t`` is a gather of at most ``t`` log-probabilities per position. The
gradient with respect to the logits ``z`` has a closed form too (with ``p`` the
softmax, ``a = s p_y / (s p_y + eps)``)::

    dL/dz_k = p_k (a - (1 - gamma) P / Z) + p_k (1 - gamma) / Z [k in S] - a [k = y]

so :func:`scalegrad_loss` is an autograd function: a fused log-softmax
forward, kept (as cross-entropy keeps it) with ``(batch, time, time)``
coefficients, and a backward that turns it into the gradient in place (an
exponential and one scaling pass). Cross-entropy through autograd allocates two
more dense tensors in its backward pass. For memory beyond that, see
:mod:`scalegrad.fused`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import warnings

import torch

from .arguments import require_tensor

logger = logging.getLogger(__name__)

__all__ = [
    "scalegrad_loss", "check_gamma", "GammaAboveOneWarning", "first_occurrence_mask", "novelty_masks",
    "scalegrad_terms", "scalegrad_logit_grad_", "split_ignored", "triton_available",
    "use_triton",
]


class GammaAboveOneWarning(UserWarning):
    """``gamma > 1``: the loss then penalises novel tokens instead of favouring them."""


def check_gamma(gamma: float, *, name: str = "gamma") -> float:
    """Validate ``gamma``: it must be a finite number > 0; > 1 only warns
    (:class:`GammaAboveOneWarning`, through :mod:`warnings`, once per value)."""
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(
            f"{name} must be a number > 0 (the paper uses 0.2, 0.5 or 0.8; 1.0 is "
            f"maximum likelihood), got {gamma}"
        )
    if gamma > 1:
        _warn_gamma_above_one(name, gamma)
    return gamma


@functools.lru_cache(maxsize=None)
def _warn_gamma_above_one(name: str, gamma: float) -> None:
    """Warn once per value, not at every training step."""
    warnings.warn(f"{name}={gamma:g} > 1 penalises novel tokens instead of favouring them",
                  GammaAboveOneWarning, stacklevel=4)


def _earlier_occurrence(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``(batch, time)`` bool: ``y[t]`` occurs at a valid position ``j < t``."""
    time = target.shape[1]
    earlier = torch.ones(time, time, dtype=torch.bool, device=target.device).tril_(-1)
    previous = (target.unsqueeze(2) == target.unsqueeze(1)) & earlier
    if valid is not None:
        previous &= valid.unsqueeze(1)
    return previous.any(dim=2)


def first_occurrence_mask(target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, time)`` bool: True where ``target[b, j]`` is the first valid
    occurrence of its id in row ``b`` (positions where ``valid`` is False are
    never first occurrences and never hide later ones)."""
    first = ~_earlier_occurrence(target, valid)
    return first & valid if valid is not None else first


def novelty_masks(target: torch.Tensor, valid: torch.Tensor | None):
    """Which earlier positions make up each position's context, and whether
    each target was already seen, for ``target (batch, time)``.

    Returns ``in_context (batch, time, time)``: position ``j`` counts in the
    context of ``t`` when ``j < t``, ``j`` is valid and ``y[j]`` did not occur
    earlier in the row (so each distinct seen token counts once); and
    ``target_seen (batch, time)``: ``y[t]`` occurs at a valid ``j < t``.
    """
    time = target.shape[1]
    target_seen = _earlier_occurrence(target, valid)
    first = ~target_seen if valid is None else ~target_seen & valid
    earlier = torch.ones(time, time, dtype=torch.bool, device=target.device).tril_(-1)
    return earlier & first.unsqueeze(1), target_seen


def scalegrad_terms(target_lprobs, context_lprobs, in_context, target_seen, gamma, eps, vocab):
    """The per-position ScaleGrad loss from gathered log-probabilities.

    ``target_lprobs (...)``: log p_t(y_t); ``context_lprobs (..., K)``: log p_t
    of candidate context tokens, counted where ``in_context (..., K)``;
    ``target_seen (...)``. Returns ``(loss, aux)`` where ``aux`` holds what the
    analytic gradient needs (used by :mod:`scalegrad.fused`).

    With ``P`` the probability mass of the seen tokens and ``s = 1`` for a
    seen target, ``gamma`` otherwise:
    ``loss = log(gamma (1 - P) + P + V eps) - log(s p_y + eps)``.
    """
    log_eps = math.log(eps) if eps > 0 else -math.inf
    context_probs = context_lprobs.exp().masked_fill(~in_context, 0.0)
    seen_mass = context_probs.sum(dim=-1)
    scaled_target_lprobs = torch.where(target_seen, target_lprobs, target_lprobs + math.log(gamma))
    # log(s p_y + eps), stable for tiny p.
    log_numerator = torch.logaddexp(
        scaled_target_lprobs, torch.full_like(scaled_target_lprobs, log_eps)
    )
    normaliser = gamma * (1.0 - seen_mass) + seen_mass + vocab * eps
    loss = normaliser.log() - log_numerator
    aux = {
        "context_probs": context_probs,
        "seen_mass": seen_mass,
        "normaliser": normaliser,
        # s p_y / (s p_y + eps): the weight of the target term in the gradient
        "target_weight": (scaled_target_lprobs - log_numerator).exp(),
    }
    return loss, aux


def split_ignored(target: torch.Tensor, ignore_index: int | None):
    """``(safe_target, valid)``: int64 targets with ignored positions set to id 0
    (so they can index), and the mask of the others (``None`` when nothing is ignored)."""
    target = target.long()
    if ignore_index is None:
        return target, None
    valid = target != ignore_index
    return target.masked_fill(~valid, 0), valid


def scalegrad_logit_grad_(probs, context_ids, target_ids, aux, gamma, position_weight):
    """Turn ``probs (..., V)`` into the gradient of ``sum(position_weight * loss)``
    with respect to the logits, in place, from :func:`scalegrad_terms`' ``aux``.

    ``context_ids (..., K)`` and ``target_ids (...)`` are the ids that were
    gathered; ``position_weight (...)`` is the incoming gradient per position
    (zero at ignored positions).
    """
    context_weight = (1.0 - gamma) / aux["normaliser"] * position_weight
    target_weight = aux["target_weight"] * position_weight
    common = target_weight - context_weight * aux["seen_mass"]
    grad = probs.mul_(common.unsqueeze(-1))
    grad.scatter_add_(-1, context_ids, aux["context_probs"] * context_weight.unsqueeze(-1))
    grad.scatter_add_(-1, target_ids.unsqueeze(-1), -target_weight.unsqueeze(-1))
    return grad


class _ScaleGradLoss(torch.autograd.Function):
    """Per-position ScaleGrad losses ``(batch, time)`` with the closed-form gradient."""

    @staticmethod
    def forward(ctx, logits, target, valid, gamma, eps):
        batch, time, vocab = logits.shape
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        # One fused log-softmax kernel; its result is kept for the backward
        # pass (as cross-entropy keeps it), where it becomes the gradient in place.
        lprobs = torch.log_softmax(logits, dim=-1, dtype=compute_dtype)
        context_ids = target.unsqueeze(1).expand(batch, time, time)
        target_lprobs = lprobs.gather(2, target.unsqueeze(2)).squeeze(2)
        context_lprobs = lprobs.gather(2, context_ids)
        in_context, target_seen = novelty_masks(target, valid)
        losses, aux = scalegrad_terms(
            target_lprobs, context_lprobs, in_context, target_seen, gamma, eps, vocab
        )
        if valid is not None:
            losses = losses.masked_fill(~valid, 0.0)
        ctx.gamma = gamma
        ctx.compute_dtype = compute_dtype
        ctx.has_valid = valid is not None
        # Kept on ctx, not saved: the backward pass overwrites it in place, which
        # autograd's saved-tensor version check would refuse.
        ctx.lprobs = lprobs
        ctx.save_for_backward(
            logits, target, aux["context_probs"], aux["seen_mass"], aux["normaliser"],
            aux["target_weight"], *([valid] if valid is not None else []),
        )
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, target, context_probs, seen_mass, normaliser, target_weight, *rest = ctx.saved_tensors
        batch, time, _ = logits.shape
        if ctx.has_valid:
            grad_losses = grad_losses.masked_fill(~rest[0], 0.0)
        if ctx.lprobs is None:  # a second backward (retain_graph=True): it was consumed
            probs = torch.softmax(logits, dim=-1, dtype=ctx.compute_dtype)
        else:
            probs, ctx.lprobs = ctx.lprobs.exp_(), None
        aux = {"context_probs": context_probs, "seen_mass": seen_mass,
               "normaliser": normaliser, "target_weight": target_weight}
        grad = scalegrad_logit_grad_(
            probs, target.unsqueeze(1).expand(batch, time, time), target, aux, ctx.gamma,
            grad_losses.to(ctx.compute_dtype),
        )
        return grad.to(logits.dtype), None, None, None, None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels import (``impl="auto"`` never fails without them)."""
    try:
        importlib.import_module(f"{__package__}.triton_scalegrad")
    except Exception as error:  # ImportError, or a Triton that cannot load its backend
        logger.info("Triton kernels unavailable, the torch path is used: %s", error)
        return False
    return True


def use_triton(impl: str, logits: torch.Tensor) -> bool:
    """Whether ``impl`` (``"auto"``, ``"torch"`` or ``"triton"``) runs the Triton kernels on
    ``logits``; ``"triton"`` without Triton raises one clear error."""
    if impl == "torch":
        return False
    if impl == "auto":
        return logits.is_cuda and logits.dtype != torch.float64 and triton_available()
    if impl != "triton":
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ImportError(
            "impl='triton' needs Triton, which is not installed: pip install \"scalegrad[triton]\" "
            "(or use impl='torch')"
        ) from None
    return True


def scalegrad_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    *,
    ignore_index: int | None = None,
    eps: float = 1e-8,
    reduction: str = "sum",
    impl: str = "auto",
) -> torch.Tensor:
    """The ScaleGrad loss of ``logits`` against ``target``.

    Args:
        logits: ``(batch, time, vocab)`` unnormalised scores (log-probabilities
            work too: log-softmax is idempotent). Any float dtype; the loss is
            computed in float32 (float64 stays float64).
        target: ``(batch, time)`` token ids.
        gamma: scale of the novel tokens' probabilities, > 0 (1.0 is maximum
            likelihood up to the ``eps`` smoothing).
        ignore_index: target id of padding: such positions are neither scored
            nor part of any later position's context.
        eps: added to every one of the ``vocab`` rescaled probabilities before
            normalising, as the original does.
        reduction: ``"sum"`` (a scalar) or ``"none"`` (``(batch, time)``, zero
            at ignored positions).
        impl: ``"torch"`` (this module's code, the reference), ``"triton"``
            (the fused kernels of :mod:`scalegrad.triton_scalegrad`: CUDA
            tensors, float32 accumulation, needs ``pip install "scalegrad[triton]"``)
            or ``"auto"``: Triton for CUDA tensors (not float64) when it
            imports, torch otherwise.

    Each row of the batch is its own sequence: the context of position ``t``
    is the row's targets before ``t`` (quirk of the original, kept: the first
    input token is never part of the context; at ``t = 0`` every token is
    novel).
    """
    gamma = check_gamma(gamma)
    require_tensor(logits, "logits", "scalegrad_loss", "(batch, time, vocab)")
    require_tensor(target, "target", "scalegrad_loss", "(batch, time)")
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if logits.dim() != 3 or target.dim() != 2 or logits.shape[:2] != target.shape:
        raise ValueError(
            "expected logits (batch, time, vocab) and target (batch, time), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if use_triton(impl, logits):
        from .triton_scalegrad import triton_scalegrad_losses

        losses = triton_scalegrad_losses(logits, target, gamma, eps=eps, ignore_index=ignore_index)
    else:
        target, valid = split_ignored(target, ignore_index)
        losses = _ScaleGradLoss.apply(logits, target, valid, gamma, eps)
    if reduction == "none":
        return losses
    return losses.sum()
