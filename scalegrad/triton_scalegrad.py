"""The ScaleGrad loss and its gradient as Triton kernels (optional: ``pip install "scalegrad[triton]"``).

:func:`scalegrad.losses.scalegrad_loss` dispatches here (``impl="triton"``, or
``impl="auto"`` on CUDA tensors when Triton imports); the torch code of
:mod:`scalegrad.losses` stays the reference and the CPU path. The formulas are
the closed forms documented there (see docs/reference.md, "loss"): with ``p``
the softmax of a row of logits ``z``, ``P`` the probability mass of the row's
distinct previously seen targets ``S``, ``s = 1`` for a seen target and
``gamma`` otherwise,

    loss     = log(gamma (1 - P) + P + V eps) - log(s p_y + eps)
    dL/dz_k  = p_k (a - (1 - gamma) P / Z) + p_k (1 - gamma) / Z [k in S] - a [k = y]

Three kernels, one program per row of logits (or per block of positions):

- ``_context_flags_kernel``: per position, whether its target is the first valid
  occurrence of its id in the row (then it counts in the context of every later
  position) and whether it occurred earlier (the target is "seen"); ``O(T^2)``
  comparisons, no ``(B, T, T)`` tensor.
- ``_scalegrad_rows_kernel`` with ``COMPUTE_STATS``: one online log-sum-exp pass
  over the row (any float dtype read natively, float32 accumulation), the
  target's logit, and ``P`` gathered over the row's earlier first occurrences;
  writes the loss, the log-sum-exp and ``P`` (three floats per row).
- the same kernel with ``WRITE_GRAD``: a second pass over the row writes the
  gradient (times the incoming gradient of that position's loss, read from
  memory: no host synchronisation and no extra scaling pass), then, after a
  block barrier, rewrites the at most ``T`` seen-token entries with their
  correction.

Autograd runs the statistics in the forward pass and the gradient in the backward
pass: two reads of the logits and one write of the gradient in all (what fused
cross-entropy kernels need), the logits left intact, and no work for the
gradient under ``torch.no_grad()``. :mod:`scalegrad.fused` runs both in one
launch per chunk.

Ids outside ``[0, V)`` (other than ``ignore_index``) are not checked on the
device: their loss is NaN (the torch path raises an index error).

On CPU tensors the kernels run only in Triton's interpreter: set
``TRITON_INTERPRET=1`` before this module is first imported (the tests do,
and unset it again).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "check_tensors", "context_flags", "triton_scalegrad_losses",
           "scalegrad_rows"]


# Reductions through tl.reduce with Triton's own combine functions rather than
# tl.sum / tl.max, which are themselves jit functions: so the kernels also run
# in the interpreter when Triton was imported before TRITON_INTERPRET was set.
_add = tl.standard._sum_combine
_max = tl.standard._elementwise_max


@triton.jit
def _context_flags_kernel(
    target_ptr, stride_yb, stride_yt, flags_ptr, time, ignore_index,
    HAS_IGNORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """flags[b, t] = 1 * (first valid occurrence of y[b, t]) + 2 * (y[b, t] at a valid j < t)."""
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * BLOCK_T
    ts = t0 + tl.arange(0, BLOCK_T)
    t_in = ts < time
    y_t = tl.load(target_ptr + b * stride_yb + ts * stride_yt, mask=t_in, other=0)
    earlier = tl.full([BLOCK_T], 0, tl.int32)
    for j0 in range(0, t0 + BLOCK_T, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        j_in = js < time
        y_j = tl.load(target_ptr + b * stride_yb + js * stride_yt, mask=j_in, other=0)
        if HAS_IGNORE:
            j_in = j_in & (y_j != ignore_index)
        hit = (y_t[:, None] == y_j[None, :]) & j_in[None, :] & (js[None, :] < ts[:, None])
        earlier = tl.maximum(earlier, tl.reduce(hit.to(tl.int32), 1, _max))
    valid = t_in
    if HAS_IGNORE:
        valid = valid & (y_t != ignore_index)
    first = (valid & (earlier == 0)).to(tl.int8)
    flags = first + 2 * (earlier != 0).to(tl.int8)
    tl.store(flags_ptr + b * time + ts, flags, mask=t_in)


@triton.jit
def _context_block(target_row, stride_yt, flags_row, j0, t, vocab, BLOCK_T: tl.constexpr):
    """Ids of the positions ``j0 ... j0 + BLOCK_T - 1`` of a row and whether each
    is in the context of position ``t`` (``j < t``, first valid occurrence, an
    id in range). The flags and the ids are loaded side by side, so that the
    gather that follows waits on one round trip to memory, not two."""
    js = j0 + tl.arange(0, BLOCK_T)
    before = js < t
    first = (tl.load(flags_row + js, mask=before, other=0) & 1) != 0
    ids = tl.load(target_row + js * stride_yt, mask=before, other=0).to(tl.int64)
    return ids, before & first & (ids >= 0) & (ids < vocab)


@triton.jit
def _scalegrad_rows_kernel(
    logits_ptr, stride_lb, stride_lt, rows_per_lb,
    target_ptr, stride_yb, stride_yt, flags_ptr,
    loss_ptr, lse_ptr, mass_ptr,
    weight_ptr, stride_wb, stride_wt,
    grad_ptr, stride_grow,
    row_start, time, vocab,
    gamma, log_gamma, eps, log_eps, ignore_index,
    HAS_IGNORE: tl.constexpr, COMPUTE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program per local row ``pid`` of the logits; its position in the
    batch is ``(b, t) = divmod(row_start + pid, time)``."""
    pid = tl.program_id(0).to(tl.int64)
    row = row_start + pid
    b = row // time
    t = row % time
    logits_row = logits_ptr + (pid // rows_per_lb) * stride_lb + (pid % rows_per_lb) * stride_lt
    target_row = target_ptr + b * stride_yb
    flags_row = flags_ptr + b * time

    y = tl.load(target_row + t * stride_yt).to(tl.int64)
    valid = y == y
    if HAS_IGNORE:
        valid = y != ignore_index
    in_range = (y >= 0) & (y < vocab)
    seen = (tl.load(flags_row + t) & 2) != 0

    if COMPUTE_STATS:
        # Online log-sum-exp over the row (ignored rows skip it).
        lse = 0.0
        if valid:
            m = float("-inf")
            d = 0.0
            for v0 in range(0, vocab, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                z = tl.load(logits_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.reduce(z, 0, _max))
                d = d * tl.exp(m - m_new) + tl.reduce(tl.exp(z - m_new), 0, _add)
                m = m_new
            lse = m + tl.log(d)
        # P: the probabilities of the row's distinct earlier targets.
        mass = 0.0
        if valid:
            for j0 in range(0, t, BLOCK_T):
                ids, in_context = _context_block(target_row, stride_yt, flags_row, j0, t, vocab, BLOCK_T)
                z_c = tl.load(logits_row + ids, mask=in_context, other=float("-inf")).to(tl.float32)
                mass += tl.reduce(tl.where(in_context, tl.exp(z_c - lse), 0.0), 0, _add)
        tl.store(lse_ptr + pid, lse)
        tl.store(mass_ptr + pid, mass)
    else:
        lse = tl.load(lse_ptr + pid)
        mass = tl.load(mass_ptr + pid)

    z_y = tl.load(logits_row + y, mask=valid & in_range, other=0.0).to(tl.float32)
    scaled_lp = z_y - lse + tl.where(seen, 0.0, log_gamma)  # log(s p_y)
    top = tl.maximum(scaled_lp, log_eps)
    log_numerator = top + tl.log(1.0 + tl.exp(-tl.abs(scaled_lp - log_eps)))  # log(s p_y + eps)
    normaliser = gamma * (1.0 - mass) + mass + vocab * eps

    if COMPUTE_STATS:
        loss = tl.log(normaliser) - log_numerator
        loss = tl.where(in_range, loss, float("nan"))
        tl.store(loss_ptr + pid, tl.where(valid, loss, 0.0))

    if WRITE_GRAD:
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + b * stride_wb + t * stride_wt).to(tl.float32)
        w = tl.where(valid, w, 0.0)
        target_weight = tl.exp(scaled_lp - log_numerator) * w  # a
        context_weight = (1.0 - gamma) / normaliser * w
        common = target_weight - context_weight * mass
        grad_row = grad_ptr + pid * stride_grow
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = tl.load(logits_row + cols, mask=cols < vocab, other=0.0).to(tl.float32)
            g = tl.exp(z - lse) * common
            g = tl.where(cols == y, g - target_weight, g)
            g = tl.where(valid, g, 0.0)
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < vocab)
        # The seen tokens' entries were written above by other threads of this program.
        tl.debug_barrier()
        if valid:
            for j0 in range(0, t, BLOCK_T):
                ids, in_context = _context_block(target_row, stride_yt, flags_row, j0, t, vocab, BLOCK_T)
                z_c = tl.load(logits_row + ids, mask=in_context, other=0.0).to(tl.float32)
                g = tl.exp(z_c - lse) * (common + context_weight)
                g = tl.where(ids == y, g - target_weight, g)
                tl.store(grad_row + ids, g.to(grad_ptr.dtype.element_ty), mask=in_context)


INTERPRETED = type(_scalegrad_rows_kernel).__name__ == "InterpretedFunction"

# Block sizes: positions per flags program and per context gather, and the
# largest vocabulary block (the tests shrink them to exercise every loop).
FLAGS_BLOCK = 64
CONTEXT_BLOCK = 256
MAX_VOCAB_BLOCK = 4096 if INTERPRETED else 16384


def _vocab_block(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab`` logits."""
    block = min(triton.next_power_of_2(vocab), MAX_VOCAB_BLOCK)
    return block, (4 if block <= 2048 else 8 if block <= 8192 else 16)


def check_tensors(*tensors: torch.Tensor) -> None:
    """Raise one clear error when the kernels cannot run on these tensors."""
    for tensor in tensors:
        if tensor.device.type != "cuda" and not INTERPRETED:
            raise ValueError(
                f"impl='triton' runs on CUDA tensors, got a tensor on {tensor.device}: use "
                "impl='torch' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before "
                "scalegrad's Triton kernels are first imported to run them in Triton's interpreter"
            )


def context_flags(target: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """``(batch, time)`` int8: bit 0 where ``target[b, t]`` is the first valid
    occurrence of its id in row ``b``, bit 1 where it occurs at a valid earlier
    position (the same sets as :func:`scalegrad.losses.novelty_masks`)."""
    batch, time = target.shape
    flags = torch.empty(batch, time, dtype=torch.int8, device=target.device)
    if flags.numel():
        grid = (batch, triton.cdiv(time, FLAGS_BLOCK))
        _context_flags_kernel[grid](
            target, target.stride(0), target.stride(1), flags, time,
            0 if ignore_index is None else ignore_index,
            HAS_IGNORE=ignore_index is not None, BLOCK_T=FLAGS_BLOCK, BLOCK_J=FLAGS_BLOCK,
        )
    return flags


def scalegrad_rows(logits, target, flags, gamma, eps, ignore_index, *, row_start=0,
                   stats=None, weight=None, grad=None):
    """Run the row kernel on ``logits``: ``(batch, time, vocab)`` with
    ``row_start = 0``, or ``(rows, vocab)``, the positions ``row_start ...`` of
    the flattened ``target (batch, time)`` (one chunk of them).

    Without ``stats``: computes and returns ``(loss, lse, mass)`` (float32, one
    per row; the loss is 0 at ignored positions). With ``stats = (lse, mass)``
    from an earlier call, only the gradient. With ``grad`` (a contiguous tensor
    shaped like the rows of logits), writes into it the gradient of
    ``sum(weight * loss)`` (``weight`` indexed like ``target``; 1 when None).
    """
    batch, time = target.shape
    vocab = logits.shape[-1]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 3:
        rows, stride_lb, stride_lt, rows_per_lb = batch * time, logits.stride(0), logits.stride(1), time
    else:
        rows, stride_lb, stride_lt, rows_per_lb = logits.shape[0], 0, logits.stride(0), max(logits.shape[0], 1)
    compute_stats = stats is None
    if compute_stats:
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        mass = torch.empty_like(loss)
    else:
        loss = None
        lse, mass = stats
    if rows == 0:
        return (loss, lse, mass) if compute_stats else None
    block_v, num_warps = _vocab_block(vocab)
    _scalegrad_rows_kernel[(rows,)](
        logits, stride_lb, stride_lt, rows_per_lb,
        target, target.stride(0), target.stride(1), flags,
        loss if compute_stats else lse, lse, mass,
        weight if weight is not None else lse,
        weight.stride(0) if weight is not None else 0, weight.stride(1) if weight is not None else 0,
        grad if grad is not None else lse, vocab,
        row_start, time, vocab,
        gamma, math.log(gamma), eps, math.log(eps) if eps > 0 else float("-inf"),
        0 if ignore_index is None else ignore_index,
        HAS_IGNORE=ignore_index is not None, COMPUTE_STATS=compute_stats,
        WRITE_GRAD=grad is not None, HAS_WEIGHT=weight is not None,
        BLOCK_V=block_v, BLOCK_T=CONTEXT_BLOCK, num_warps=num_warps,
    )
    return (loss, lse, mass) if compute_stats else None


class _TritonScaleGradLoss(torch.autograd.Function):
    """Per-position losses ``(batch, time)``: statistics in the forward pass, the
    gradient (scaled by the incoming one inside the kernel) in the backward pass."""

    @staticmethod
    def forward(ctx, logits, target, gamma, eps, ignore_index):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()
        flags = context_flags(target, ignore_index)
        loss, lse, mass = scalegrad_rows(logits, target, flags, gamma, eps, ignore_index)
        ctx.gamma, ctx.eps, ctx.ignore_index = gamma, eps, ignore_index
        ctx.save_for_backward(logits, target, flags, lse, mass)
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_losses):
        logits, target, flags, lse, mass = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        scalegrad_rows(logits, target, flags, ctx.gamma, ctx.eps, ctx.ignore_index,
                       stats=(lse, mass), weight=grad_losses, grad=grad.view(-1, logits.shape[-1]))
        return grad, None, None, None, None


def triton_scalegrad_losses(logits: torch.Tensor, target: torch.Tensor, gamma: float, *,
                            eps: float = 1e-8, ignore_index: int | None = None) -> torch.Tensor:
    """Per-position ScaleGrad losses ``(batch, time)`` (float32, 0 at ignored
    positions) of ``logits (batch, time, vocab)``; arguments already checked by
    :func:`scalegrad.losses.scalegrad_loss`."""
    check_tensors(logits, target)
    return _TritonScaleGradLoss.apply(logits, target, gamma, eps, ignore_index)

