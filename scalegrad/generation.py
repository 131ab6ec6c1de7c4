"""Continuing prefixes: greedy, top-k and nucleus (top-p) sampling, and contrastive search,
batched, with a KV cache.

The original (``docs/reference.md``, section 3) continues a batch of prefixes greedily, or samples
one prefix at a time after ``top_k_top_p_filtering``. Here both paths work on a
whole batch: the filter is applied row by row with the same arithmetic as the
original's one-row function, and sampling draws one token per row with
``torch.multinomial``. The model's key/value cache is reused, so each step after
the first feeds only the newest token.

Contrastive search (Su et al., 2022; ``docs/contrastive-search.md``) is
:mod:`scalegrad.contrastive_decoding`; :func:`generate_continuations` dispatches
there when given ``penalty_alpha``, and its names (:func:`contrastive_search`,
:func:`contrastive_steps`, :class:`HFStepper`, ...) are importable from here too.
The prefixes' checks and sub-batches are :mod:`scalegrad.prefix_batches`'.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# contrastive search lives in its own module; its names are importable from here too
from .contrastive_decoding import (CandidatesByReorder, HFStepper, check_contrastive,  # noqa: F401
                                   contrastive_scores, contrastive_search, contrastive_steps,
                                   tree_candidates_work)
from .hf import accepts, cache_argument, returned_cache
from .prefix_batches import check_prefixes, check_request, in_batches


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                          filter_value: float = -float("inf")) -> torch.Tensor:
    """Set the logits outside the top-k and/or the nucleus to ``filter_value``.

    ``logits`` is ``(batch, vocab)``; each row gets exactly what the original
    one-row function gives it:

    - ``top_k > 0``: keep the logits >= the k-th largest (ties with it are kept);
      ``top_k`` larger than the vocabulary keeps everything.
    - ``top_p > 0``: sort descending, remove the tokens whose cumulative softmax
      probability is above ``top_p``, shifted right by one so the first token
      above the threshold is kept; the most likely token is always kept. Applied
      after the top-k filter, on what it left.

    Tied logits are ordered by the same ``torch.sort`` call as the original's (on
    the CPU a row sorts the same alone or in a batch; which tie survives at the
    nucleus edge is otherwise unspecified, as in the original). The input is not
    modified; a new tensor is returned.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (batch, vocab), got {tuple(logits.shape)}")
    filtered = logits.clone()
    top_k = min(top_k, logits.size(-1))
    if top_k > 0:
        kth_largest = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth_largest, filter_value)
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(filtered, dim=-1, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_to_remove = cumulative_probs > top_p
        sorted_to_remove[:, 1:] = sorted_to_remove[:, :-1].clone()
        sorted_to_remove[:, 0] = False
        to_remove = torch.zeros_like(sorted_to_remove).scatter(1, sorted_indices, sorted_to_remove)
        filtered = filtered.masked_fill(to_remove, filter_value)
    return filtered


def is_greedy(top_k: int, top_p: float) -> bool:
    """The original's rule: greedy exactly when ``top_k == 1 and top_p == 0``."""
    return top_k == 1 and top_p == 0


def generate_continuations(model, prefixes: torch.Tensor, continuation_length: int, *,
                           top_k: int = 1, top_p: float = 0.0, batch_size: int | None = None,
                           generator: torch.Generator | None = None,
                           penalty_alpha: float | None = None,
                           progress: bool = False) -> torch.Tensor:
    """Continue every prefix by ``continuation_length`` tokens.

    ``prefixes`` is a ``(B, P)`` LongTensor (all prefixes the same length, so no
    attention mask is needed). Greedy (argmax) when ``top_k == 1 and top_p == 0``,
    otherwise :func:`top_k_top_p_filtering`, softmax and ``torch.multinomial``
    with ``generator`` (when the generator lives on another device than the model,
    the probabilities are moved to the generator's device to draw). With
    ``penalty_alpha`` (in [0, 1], with ``top_k > 1`` and ``top_p == 0``):
    contrastive search (:func:`contrastive_search`; no random draw). Rows are
    processed in sub-batches of ``batch_size`` (``None``: all at once); the result
    does not depend on it for greedy decoding and contrastive search. Runs under
    ``torch.inference_mode()`` on the model's device, with the model in eval mode
    (its previous mode is restored).

    Returns ``(B, P + continuation_length)`` int64 on the device of ``prefixes``:
    each prefix followed by its continuation.
    """
    check_prefixes(prefixes)
    if penalty_alpha is not None:
        continuations = contrastive_search(
            model, prefixes, continuation_length, penalty_alpha=penalty_alpha, top_k=top_k,
            top_p=top_p, batch_size=batch_size, progress=progress)
        return torch.cat([prefixes.to(torch.int64), continuations], dim=1)
    check_request(model, continuation_length, top_k, top_p, batch_size, prefixes.size(1))
    num_rows = prefixes.size(0)
    if num_rows == 0 or continuation_length == 0:
        return prefixes.to(torch.int64).clone()

    def continue_batch(batch, _mask, bar):
        return _continue_batch(model, batch, continuation_length, top_k, top_p, generator, bar)

    return in_batches(model, prefixes, None, batch_size, continuation_length, progress,
                       continue_batch)


def _continue_batch(model, prefixes: torch.Tensor, continuation_length: int, top_k: int,
                    top_p: float, generator: torch.Generator | None, bar) -> torch.Tensor:
    greedy = is_greedy(top_k, top_p)
    # transformers renamed the cache argument and output field from
    # ``past_key_values`` to ``cache`` (5.2x); use whichever this model takes.
    cache_keyword = cache_argument(model)
    # Only the last position's logits are needed: skip the (P, V) projection of
    # the prefix in the first step where the model allows it.
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    tokens = [prefixes]
    next_input = prefixes
    cache = None
    for _ in range(continuation_length):
        output = model(input_ids=next_input, use_cache=True, **{cache_keyword: cache}, **extra)
        logits = output.logits[:, -1, :]
        cache = returned_cache(output)
        if greedy:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            filtered = top_k_top_p_filtering(logits.float(), top_k=top_k, top_p=top_p)
            probs = F.softmax(filtered, dim=-1)
            next_token = _multinomial(probs, generator)
        tokens.append(next_token)
        next_input = next_token
        if bar is not None:
            bar.update(1)
    return torch.cat(tokens, dim=1)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, num_samples=1, generator=generator)
    sample = torch.multinomial(probs.to(generator.device), num_samples=1, generator=generator)
    return sample.to(probs.device)
