"""The ScaleGrad loss straight from hidden states, without the full logits.

For long sequences and big vocabularies the ``(batch, time, vocab)`` logits (and
their gradient) dominate a training step's memory. Given the final hidden states
and the output embedding, :func:`fused_linear_scalegrad_loss` computes the loss
in chunks of positions: each chunk's logits are made, turned into the loss and
its analytic gradient, multiplied back into gradients for the hidden states and
the embedding, and dropped (the approach of fused linear cross-entropy
kernels). Positions are independent given the targets, so chunking is exact.

The gradient with respect to each chunk's logits is the closed form of
:mod:`scalegrad.losses` (``scalegrad_logit_grad_``), shared with the plain loss.
The same pass can also return what the token-level metrics need (``statistics=True``),
so a training step never makes a chunk's logits twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import (
    check_gamma, novelty_masks, scalegrad_logit_grad_, scalegrad_terms, split_ignored, use_triton,
)
from .metrics import token_statistics

__all__ = ["fused_linear_scalegrad_loss", "fused_linear_loss", "ScaleGradChunks", "scalegrad_objective",
           "chunked_logit_statistics"]


_STATISTICS = ("nll", "higher", "predictions", "loss", "entropy")


class ScaleGradChunks:
    """The ScaleGrad objective of the fused loop, one chunk of positions at a time.

    This is the loop's seam for *which* per-chunk objective it computes: the loop
    (:class:`_FusedLinearLoss`) makes each chunk's logits, hands them to
    ``objective.chunk``, and multiplies the logit gradient it returns back into
    the gradients of the hidden states and the head. Another objective is an
    object with the same three members:

    - ``begin(target, valid, capacity, vocab, dtype, needs_logit_grad)``: once per
      call, with the int64 ``target (batch, time)`` (ignored positions set to id 0),
      ``valid`` (``None`` or the mask of the scored positions), the most rows a
      chunk has, the logits' compute dtype and whether gradients are wanted;
    - ``chunk(logits, start, stop, row_max=None)`` -> ``(losses, grad_logits, lse)``:
      the loss of each flattened position ``start:stop`` (zero where not valid) from
      their logits ``(stop - start, vocab)`` (which it may overwrite), the gradient of their sum
      with respect to the logits (``None`` when no gradient is wanted; it may be
      the logits' own storage) and each row's log-sum-exp (for ``nll``).
      ``row_max`` is each row's maximum when the loop already has it;
    - ``gamma``-like settings of its own, as attributes (the loop never reads them).
    """

    def __init__(self, gamma: float, eps: float, kernels=None):
        self.gamma, self.eps, self.kernels = gamma, eps, kernels

    def begin(self, target, valid, capacity, vocab, dtype, needs_logit_grad):
        batch, time = target.shape
        self.target, self.valid, self.time, self.vocab = target, valid, time, vocab
        self.needs_logit_grad = needs_logit_grad
        self.flat_valid = valid.reshape(-1) if valid is not None else None
        if self.kernels is not None:  # the Triton kernels: loss and gradient in one launch per chunk
            self.kernel_target = target.masked_fill(~valid, -1) if valid is not None else target
            self.kernel_ignore = -1 if valid is not None else None
            self.flags = self.kernels.context_flags(self.kernel_target, self.kernel_ignore)
            self.grad_buffer = (torch.empty(capacity, vocab, dtype=dtype, device=target.device)
                                if needs_logit_grad else None)
            return
        self.in_context, self.target_seen = novelty_masks(target, valid)
        self.row_of = torch.arange(batch, device=target.device).repeat_interleave(time)

    def chunk(self, logits, start, stop, row_max=None):
        flat_target = self.target.reshape(-1)
        y = flat_target[start:stop]
        if self.kernels is not None:
            grad_logits = self.grad_buffer[:stop - start] if self.grad_buffer is not None else None
            loss, row_lse, _ = self.kernels.scalegrad_rows(
                logits, self.kernel_target, self.flags, self.gamma, self.eps, self.kernel_ignore,
                row_start=start, grad=grad_logits)
            return loss, grad_logits, row_lse
        rows = self.row_of[start:stop]
        positions = torch.arange(start, stop, device=y.device) % self.time
        context_ids = self.target[rows]  # (chunk, time)
        in_context = self.in_context[rows, positions]
        target_seen = self.target_seen[rows, positions]
        target_logits = logits.gather(1, y[:, None])
        context_logits = logits.gather(1, context_ids)
        # exp(logits - max) / sum, as logsumexp computes it, in place: no (chunk, vocab)
        # temporary.
        if row_max is None:
            row_max = logits.max(dim=1, keepdim=True).values
        sum_exp = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)
        lse = row_max + sum_exp.log()
        target_lprobs = (target_logits - lse).squeeze(1)
        context_lprobs = context_logits - lse
        loss, aux = scalegrad_terms(
            target_lprobs, context_lprobs, in_context, target_seen, self.gamma, self.eps, self.vocab
        )
        chunk_valid = self.flat_valid[start:stop] if self.flat_valid is not None else None
        if chunk_valid is not None:
            loss = loss.masked_fill(~chunk_valid, 0.0)
        if not self.needs_logit_grad:
            return loss, None, lse.squeeze(1)
        # The closed-form gradient with respect to this chunk's logits, in place.
        position_weight = (chunk_valid.to(logits.dtype) if chunk_valid is not None
                           else torch.ones_like(loss))
        grad_logits = scalegrad_logit_grad_(
            logits.div_(sum_exp), context_ids, y, aux, self.gamma, position_weight
        )
        return loss, grad_logits, lse.squeeze(1)


class _FusedLinearLoss(torch.autograd.Function):
    """The chunk loop: logits of ``chunk_size`` positions at a time, the objective's loss
    and logit gradient (:class:`ScaleGradChunks`), multiplied back into the gradients of
    the hidden states, the weight and the bias; all in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, valid, objective, chunk_size, statistics, entropy):
        batch, time, dim = hidden.shape
        vocab = weight.shape[0]
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        flat_hidden = hidden.reshape(batch * time, dim)
        flat_target = target.reshape(-1)
        capacity = min(chunk_size, batch * time)

        needs_grad = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(flat_hidden) if needs_grad[0] else None
        # Outside autocast the first chunk's product is written into grad_weight and the
        # others are accumulated by the matmul itself (no zero fill, no temporaries), and
        # every chunk's logits go into one buffer: on a CPU each fresh (chunk, vocab) or
        # (vocab, dim) tensor costs its page faults again.
        autocast = torch.is_autocast_enabled(hidden.device.type)
        in_place = not autocast and batch * time > 0
        grad_weight = ((torch.empty if in_place else torch.zeros)(
            weight.shape, dtype=compute_dtype, device=weight.device) if needs_grad[1] else None)
        logits_buffer = (torch.empty(capacity, vocab, dtype=weight.dtype, device=weight.device)
                         if in_place else None)
        grad_bias = (
            torch.zeros(vocab, dtype=compute_dtype, device=weight.device)
            if bias is not None and needs_grad[2] else None
        )
        needs_logit_grad = grad_hidden is not None or grad_weight is not None or grad_bias is not None
        objective.begin(target, valid, capacity, vocab, compute_dtype, needs_logit_grad)
        total = torch.zeros((), dtype=compute_dtype, device=hidden.device)
        parts: dict[str, list] = {key: [] for key in _STATISTICS}

        for start in range(0, batch * time, chunk_size):
            stop = min(start + chunk_size, batch * time)
            h = flat_hidden[start:stop]
            # As the model's head computes them (one addmm with a bias), so the
            # statistics compare the same values as logits from the head would.
            if logits_buffer is not None:  # the kernels F.linear calls, into the buffer
                out = logits_buffer[:stop - start]
                logits = (torch.mm(h, weight.t(), out=out) if bias is None
                          else torch.addmm(bias, h, weight.t(), out=out)).to(compute_dtype)
            else:
                logits = F.linear(h, weight, bias).to(compute_dtype)
            row_max = None
            if statistics:  # read before the objective may overwrite the logits
                target_logits = logits.gather(1, flat_target[start:stop, None])
                # One pass gives the row maximum (for the objective) and the argmax.
                row_max, predictions = logits.max(dim=1, keepdim=True)
                parts["higher"].append((logits > target_logits).sum(dim=1))
                parts["predictions"].append(predictions.squeeze(1))
                if entropy:  # H(p) = lse - sum_v p_v z_v
                    probs = torch.softmax(logits, dim=1)
                    row_lse = torch.logsumexp(logits, dim=1)
                    parts["entropy"].append(row_lse - (probs.mul_(logits)).sum(dim=1))
                    del probs
            losses, grad_logits, lse = objective.chunk(logits, start, stop, row_max=row_max)
            total += losses.sum()
            if statistics:
                parts["nll"].append(lse - target_logits.squeeze(1))
                parts["loss"].append(losses.detach())
            if grad_logits is not None:
                _backprop_chunk(grad_logits, h, weight, start, stop, grad_hidden, grad_weight, grad_bias)

        ctx.save_for_backward(
            grad_hidden.view(batch, time, dim) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )
        if not statistics:
            return total
        stats = tuple(torch.cat(parts[key]) if parts[key] else torch.zeros(
            0, dtype=torch.int64 if key in ("higher", "predictions") else compute_dtype, device=hidden.device)
            for key in _STATISTICS)
        ctx.mark_non_differentiable(*stats)
        return (total, *stats)

    @staticmethod
    def backward(ctx, grad_output, *_statistics_grads):
        # The gradients were computed in the forward pass; they are scaled in place
        # (no second (vocab, dim) tensor), so a second backward would be wrong.
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("fused_linear_scalegrad_loss: backward can run once per forward")
        ctx.backward_done = True
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_hidden.mul_(grad_output) if grad_hidden is not None else None,
            grad_weight.mul_(grad_output) if grad_weight is not None else None,
            grad_bias.mul_(grad_output) if grad_bias is not None else None,
            None, None, None, None, None, None,
        )


def _backprop_chunk(grad_logits, h, weight, start, stop, grad_hidden, grad_weight, grad_bias):
    """Accumulate one chunk's logit gradient into the gradients of the head's inputs."""
    if grad_hidden is not None:
        grad_hidden[start:stop] = (grad_logits.to(weight.dtype) @ weight).to(grad_hidden.dtype)
    if grad_weight is not None:
        if torch.is_autocast_enabled(h.device.type):  # the product in the autocast dtype
            grad_weight += grad_logits.t() @ h.to(grad_weight.dtype)
        elif start == 0:  # grad_weight is uninitialised (see forward)
            torch.mm(grad_logits.t(), h.to(grad_weight.dtype), out=grad_weight)
        else:
            grad_weight.addmm_(grad_logits.t(), h.to(grad_weight.dtype))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def scalegrad_objective(gamma: float, eps: float, impl: str, hidden: torch.Tensor,
                        target: torch.Tensor | None = None) -> ScaleGradChunks:
    """The ScaleGrad objective for the chunk loop on ``hidden``'s device: with the Triton
    kernels of :mod:`scalegrad.triton_scalegrad` when ``impl`` asks for them
    (:func:`scalegrad.losses.use_triton`), else the torch path (``gamma`` already checked)."""
    kernels = None
    if use_triton(impl, hidden):
        from . import triton_scalegrad as kernels

        kernels.check_tensors(hidden, *([target] if target is not None else []))
    return ScaleGradChunks(gamma, eps, kernels)


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, objective, *,
                      bias: torch.Tensor | None = None, ignore_index: int | None = None,
                      chunk_size: int = 256, statistics: bool = False, entropy: bool = False):
    """The summed loss of ``objective`` (:class:`ScaleGradChunks` or another object
    with its members) over ``logits = hidden @ weight.T (+ bias)``, ``chunk_size``
    positions at a time: the one chunk loop behind :func:`fused_linear_scalegrad_loss`
    (its arguments and return values, the objective in place of ``gamma``).

    The statistics also hold ``loss``, the objective's loss at each position (zero where
    ignored, without gradient), and with ``entropy=True`` ``entropy``, the entropy of the
    model's distribution at each position (two more passes over each chunk's logits)."""
    if hidden.dim() != 3 or target.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden (batch, time, dim) and target (batch, time), got "
            f"{tuple(hidden.shape)} and {tuple(target.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    target, valid = split_ignored(target, ignore_index)
    if not torch.is_grad_enabled():  # no gradient work under torch.no_grad()
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    out = _FusedLinearLoss.apply(hidden, weight, bias, target, valid, objective, chunk_size,
                                 statistics, entropy)
    if not statistics:
        return out
    stats = dict(zip(_STATISTICS, out[1:]))
    if not entropy:
        del stats["entropy"]
    return out[0], stats


def fused_linear_scalegrad_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    gamma: float,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int | None = None,
    eps: float = 1e-8,
    chunk_size: int = 256,
    statistics: bool = False,
    impl: str = "auto",
):
    """Summed ScaleGrad loss of ``logits = hidden @ weight.T (+ bias)``, equal in
    value and gradients to ``scalegrad_loss(logits, target, gamma, ...)``, with
    at most ``chunk_size`` positions' logits in memory at a time.

    ``hidden`` is ``(batch, time, dim)``, ``weight`` ``(vocab, dim)`` (GPT-2's
    ``lm_head.weight``), ``target`` ``(batch, time)``. Gradients flow to
    ``hidden``, ``weight`` and ``bias``; the gradients are computed during the
    forward pass, so call ``backward`` on the result (or on a scalar multiple
    of it) once.

    With ``statistics=True`` returns ``(loss, stats)``: per flattened position,
    from the very logits each chunk's loss is computed from (no second matmul),
    ``stats["nll"]`` (``logsumexp(logits) - logits[target]``, natural log, in
    float32, float64 for float64 inputs), ``stats["higher"]`` (how many logits
    are strictly greater than the target's) and ``stats["predictions"]`` (the
    argmax): what :func:`scalegrad.metrics.token_statistics` gives from the full
    logits. At positions equal to ``ignore_index`` they are meaningless (the
    caller drops them). Under autocast the head's matmul runs in the autocast
    dtype, as the model's own head would.

    ``impl`` as in :func:`scalegrad.losses.scalegrad_loss`: with Triton (the
    default on CUDA when it imports) each chunk's loss and logit gradient come
    from one launch of the kernels of :mod:`scalegrad.triton_scalegrad`.
    """
    objective = scalegrad_objective(check_gamma(gamma), eps, impl, hidden, target)
    return fused_linear_loss(hidden, weight, target, objective, bias=bias,
                             ignore_index=ignore_index, chunk_size=chunk_size, statistics=statistics)


@torch.no_grad()
def chunked_logit_statistics(hidden: torch.Tensor, weight: torch.Tensor, bias,
                             target: torch.Tensor, chunk_size: int, *, nll: bool = True,
                             ranks: bool = True) -> dict:
    """Per position of ``hidden (..., H)`` and ``target (...)`` (valid ids): from
    ``logits = hidden @ weight.T + bias``, made ``chunk_size`` positions at a time
    without gradients and compared in float32 (as the plain path's ``logits.float()``),

    - ``nll``: ``logsumexp(logits) - logits[target]`` (natural log);
    - ``higher``: how many logits are strictly greater than the target's;
    - ``predictions``: the argmax.

    With ``higher`` and ``predictions``, :func:`scalegrad.metrics.ranking_metrics_from_ranks`
    gives the token-level metrics. Under autocast the matmul runs in the autocast
    dtype, as the plain path's head. The full logits never exist; the cost is one
    more forward matmul of the head (when the loss is computed too, ask
    :func:`fused_linear_scalegrad_loss` for ``statistics=True`` instead: one pass).
    """
    flat_hidden = hidden.detach().reshape(-1, hidden.size(-1))
    flat_target = target.reshape(-1).long()
    parts: dict[str, list] = {"nll": [], "higher": [], "predictions": []}
    for start in range(0, flat_target.numel(), chunk_size):
        logits = F.linear(flat_hidden[start:start + chunk_size], weight, bias).float()
        stats = token_statistics(logits, flat_target[start:start + chunk_size], nll=nll, ranks=ranks)
        for key, value in stats.items():
            parts[key].append(value)
    empty = {"nll": flat_target.new_zeros(0, dtype=torch.float32), "higher": flat_target.new_zeros(0),
             "predictions": flat_target.new_zeros(0)}
    return {key: torch.cat(values) if values else empty[key]
            for key, values in parts.items() if values or (nll if key == "nll" else ranks)}
