"""Prefixes for the decoders of :mod:`scalegrad.generation` and
:mod:`scalegrad.contrastive_decoding`: their checks, their left alignment when
rows have different lengths, and the loop over sub-batches on the model's device
in inference and evaluation mode. Pure torch."""

from __future__ import annotations

import math

import torch

from .errors import UserError

__all__ = ["check_prefixes", "check_request", "in_batches", "left_aligned", "model_device"]


def left_aligned(prefixes: torch.Tensor, mask: torch.Tensor):
    """Each row's tokens (under ``mask``) moved to the right end: ``(ids, mask)``
    left-padded (padding ids 0), or ``(prefixes, None)`` when nothing is padded."""
    if bool(mask.all()):
        return prefixes, None
    lengths = mask.sum(dim=1, keepdim=True)
    width = prefixes.size(1)
    # stable sort puts the padding first and keeps the tokens' order
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices
    ids = prefixes.gather(1, order)
    aligned = torch.arange(width, device=mask.device)[None, :] >= width - lengths
    return ids.masked_fill(~aligned, 0), aligned


def check_prefixes(prefixes: torch.Tensor) -> None:
    if prefixes.dim() != 2:
        raise ValueError(f"expected prefixes of shape (batch, prefix_length), got {tuple(prefixes.shape)}")
    if prefixes.dtype.is_floating_point or prefixes.dtype == torch.bool:
        raise ValueError(f"expected integer token ids, got {prefixes.dtype}")


def check_request(model, continuation_length: int, top_k: int, top_p: float,
                   batch_size: int | None, prefix_length: int) -> None:
    if continuation_length < 0:
        raise UserError(f"continuation length must be >= 0, got {continuation_length}")
    if top_k < 0:
        raise UserError(f"top-k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0 or math.isnan(top_p):
        raise UserError(f"top-p must be between 0 and 1, got {top_p}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"generation batch size must be >= 1, got {batch_size}")
    if prefix_length < 1:
        raise UserError("prefixes must hold at least one token")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    total_length = prefix_length + continuation_length
    if isinstance(max_positions, int) and total_length > max_positions:
        raise UserError(f"prefix length {prefix_length} + continuation length "
                        f"{continuation_length} = {total_length} exceeds the model's "
                        f"{max_positions} positions; shorten one of them")


def in_batches(model, prefixes, mask, batch_size, continuation_length, progress, continue_batch):
    """``continue_batch(batch, mask, bar)`` over sub-batches of ``batch_size`` rows, on
    the model's device, in inference and eval mode; results on ``prefixes``' device."""
    num_rows = prefixes.size(0)
    step = num_rows if batch_size is None else batch_size
    device = model_device(model)
    was_training = model.training
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=-(-num_rows // step) * continuation_length, desc="Generating", unit="tok")
    try:
        model.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, num_rows, step):
                batch = prefixes[start:start + step].to(device=device, dtype=torch.int64)
                batch_mask = None
                if mask is not None:
                    batch, batch_mask = left_aligned(batch, mask[start:start + step].to(device))
                outputs.append(continue_batch(batch, batch_mask, bar).to(prefixes.device))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return torch.cat(outputs, dim=0)


def model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")
