"""Contrastive search (Su et al., 2022; ``docs/contrastive-search.md``), batched, with the
model's key/value cache: :func:`contrastive_search` for a Hugging Face causal LM, and
its per-step loop :func:`contrastive_steps`, which the fairseq driver runs over its own
decoder.

At each step the ``top_k`` most probable candidates ``v`` of every row are fed through
the model (as K tokens of the row at one position, each seeing the row's earlier
tokens and not the other candidates: :class:`HFStepper`) and scored ``(1 - alpha) *
p(v) - alpha * max_j cos(h_v, h_j)`` over the row's previous final hidden states
``h_j`` (prefix and generated, padding excluded); the best candidate is taken.
:func:`scalegrad.generation.generate_continuations` dispatches here when given
``penalty_alpha``.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from .errors import UserError
from .hf import accepts, cache_argument, check_linear_head, reorder_cache, returned_cache
from .prefix_batches import check_prefixes, check_request, in_batches, model_device

__all__ = ["check_contrastive", "contrastive_search", "contrastive_scores", "contrastive_steps",
           "CandidatesByReorder", "HFStepper", "tree_candidates_work"]


def check_contrastive(penalty_alpha: float, top_k: int, top_p: float = 0.0) -> None:
    """Contrastive search's settings, as :class:`UserError` with the drivers' flag names:
    ``0 <= penalty_alpha <= 1``, ``top_k > 1``, ``top_p == 0``."""
    if not 0.0 <= penalty_alpha <= 1.0 or math.isnan(penalty_alpha):
        raise UserError(f"--penalty-alpha must be between 0 and 1, got {penalty_alpha}")
    if top_k <= 1:
        raise UserError(f"--penalty-alpha needs --top-k K > 1 (the candidates scored at each "
                        f"step), got --top-k {top_k}")
    if top_p != 0.0:
        raise UserError(f"--penalty-alpha (contrastive search) takes no --top-p, got {top_p}")


def contrastive_search(model, prefixes: torch.Tensor, continuation_length: int, *,
                       penalty_alpha: float, top_k: int, top_p: float = 0.0,
                       attention_mask: torch.Tensor | None = None,
                       batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Contrastive search (``docs/contrastive-search.md``) for a Hugging Face causal LM:
    the ``(B, continuation_length)`` int64 continuation of every row of ``prefixes``
    ``(B, P)``, on the device of ``prefixes``.

    ``attention_mask`` ``(B, P)`` (1: a token of the row, 0: padding) lets the rows
    have different lengths, padded on the left or on the right: a row's prefix is
    its tokens under a 1, in order (rows are left-aligned internally, with
    position ids counted from each row's first token). Each row's continuation is
    the one the row gets alone, whatever the padding, ``batch_size`` (rows per
    sub-batch; ``None``: all at once) and its neighbours (up to floating-point
    rounding, which may in rare near-ties pick another candidate). ``penalty_alpha
    = 0`` is greedy decoding. Runs under ``torch.inference_mode()``, the model in
    eval mode (restored afterwards), on the model's device.
    """
    check_prefixes(prefixes)
    check_contrastive(penalty_alpha, top_k, top_p)
    if attention_mask is not None:
        if attention_mask.shape != prefixes.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the "
                             f"prefixes' shape {tuple(prefixes.shape)}")
        attention_mask = attention_mask.to(device=prefixes.device, dtype=torch.bool)
        if prefixes.size(0) and not attention_mask.any(dim=1).all():
            raise UserError("every prefix must hold at least one token (a row of the "
                            "attention mask is all padding)")
        longest = int(attention_mask.sum(dim=1).max()) if prefixes.size(0) else 0
    else:
        longest = prefixes.size(1)
    check_request(model, continuation_length, top_k, top_p, batch_size, longest)
    if prefixes.size(0) == 0 or continuation_length == 0:
        return prefixes.new_zeros(prefixes.size(0), continuation_length, dtype=torch.int64)

    def continue_batch(batch, mask, bar):
        stepper = HFStepper(model)
        logits, context, context_mask = stepper.start(batch, mask)
        return contrastive_steps(stepper, logits, context, context_mask, continuation_length,
                                 penalty_alpha=penalty_alpha, top_k=top_k, bar=bar)

    return in_batches(model, prefixes, attention_mask, batch_size, continuation_length, progress,
                       continue_batch)


def contrastive_scores(context_hidden: torch.Tensor, context_mask: torch.Tensor | None,
                       candidate_hidden: torch.Tensor, candidate_probs: torch.Tensor,
                       penalty_alpha: float) -> torch.Tensor:
    """``(B, K)`` scores ``(1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)`` of K
    candidates per row (``docs/contrastive-search.md``).

    ``context_hidden`` ``(B, S, E)``: the row's previous final hidden states;
    ``context_mask`` ``(B, S)`` (``True``: a real position; ``None``: all are), the
    positions under ``False`` (padding) take no part in the max;
    ``candidate_hidden`` ``(B, K, E)``; ``candidate_probs`` ``(B, K)``. Computed in
    float32 (SimCTG's ``ranking_fast``, with the padding mask added).
    """
    context = context_hidden.float()
    candidates = candidate_hidden.float()
    context = context / context.norm(dim=-1, keepdim=True)
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    cosine = torch.matmul(candidates, context.transpose(1, 2))  # (B, K, S)
    if context_mask is not None:
        cosine = cosine.masked_fill(~context_mask[:, None, :], -float("inf"))
    degeneration_penalty = cosine.max(dim=-1).values
    return (1.0 - penalty_alpha) * candidate_probs.float() - penalty_alpha * degeneration_penalty


def contrastive_steps(stepper, logits: torch.Tensor, context_hidden: torch.Tensor,
                      context_mask: torch.Tensor | None, continuation_length: int, *,
                      penalty_alpha: float, top_k: int, banned_token: int | None = None,
                      bar=None) -> torch.Tensor:
    """The per-step loop of contrastive search, for any decoder: ``(B, continuation_length)`` ids.

    ``logits`` ``(B, V)``: the next-token logits after each row's prefix;
    ``context_hidden`` ``(B, S, E)`` and ``context_mask`` (see
    :func:`contrastive_scores`): the prefix's final hidden states. ``stepper``
    holds the decoder's state (its key/value cache) and has ``candidates(ids)``
    (feed the ``(B, K)`` candidate ids, each on its own row's state; returns
    their ``(B, K, E)`` final hidden states), ``choose(best)`` (keep candidate
    ``best[b]`` of each row ``b``) and ``next_logits()`` (the ``(B, V)`` logits
    after the chosen candidates: only those are asked for, so a decoder can
    apply its output layer to those rows alone). :class:`CandidatesByReorder`
    makes the first two from a decoder's ``reorder(rows)`` and ``extend(tokens)``.
    ``banned_token`` (a padding id, say) is never a candidate.
    """
    rows = logits.size(0)
    top_k = min(top_k, logits.size(-1))
    arange = torch.arange(rows, device=logits.device)
    generated = []
    for step in range(continuation_length):
        logits = logits.float()
        if banned_token is not None and 0 <= banned_token < logits.size(-1):
            logits = logits.clone()
            logits[:, banned_token] = -float("inf")
        probs = F.softmax(logits, dim=-1)
        candidate_ids = torch.topk(logits, top_k, dim=-1).indices  # (B, K)
        candidate_probs = probs.gather(1, candidate_ids)
        candidate_hidden = stepper.candidates(candidate_ids)  # (B, K, E)
        scores = contrastive_scores(context_hidden, context_mask, candidate_hidden,
                                    candidate_probs, penalty_alpha)
        best = scores.argmax(dim=-1)  # (B,)
        generated.append(candidate_ids.gather(1, best[:, None]))
        if bar is not None:
            bar.update(1)
        if step + 1 == continuation_length:
            break  # no next step: no cache to keep, no logits, no new context
        stepper.choose(best)
        logits = stepper.next_logits()
        context_hidden = torch.cat([context_hidden, candidate_hidden[arange, best][:, None]], dim=1)
        if context_mask is not None:
            context_mask = torch.cat([context_mask, context_mask.new_ones(rows, 1)], dim=1)
    return torch.cat(generated, dim=1)


class CandidatesByReorder:
    """``candidates`` and ``choose`` (:func:`contrastive_steps`) for a decoder state
    with ``reorder(rows)`` (its rows become ``rows``, a LongTensor of row indices,
    repeats allowed) and ``extend(tokens)`` (feed one ``(N, 1)`` token per row;
    returns the ``(N, E)`` final hidden states): each row's state is copied K
    times, one copy per candidate, and the chosen copy is kept."""

    def candidates(self, ids: torch.Tensor) -> torch.Tensor:
        rows, self._top_k = ids.shape
        self.reorder(torch.arange(rows, device=ids.device).repeat_interleave(self._top_k))
        return self.extend(ids.reshape(-1, 1)).reshape(rows, self._top_k, -1)

    def choose(self, best: torch.Tensor) -> None:
        self.reorder(torch.arange(best.size(0), device=best.device) * self._top_k + best)


class HFStepper(CandidatesByReorder):
    """A Hugging Face causal LM's state during contrastive search: its key/value cache,
    and, for padded rows, the attention mask and the next position id of each row.
    See :func:`contrastive_steps`.

    The K candidates of a row are fed as K tokens of that row at the same
    position, under a custom 4D attention mask by which each candidate sees the
    row's earlier tokens and itself, not the other candidates (``tree``: the row's
    cache is not copied K times; the candidates not chosen stay in the cache,
    masked out for good). This is used when the model honours such a mask and
    position ids, checked on a few tokens at the start (:func:`tree_candidates_work`);
    otherwise each row's cache is copied K times (:class:`CandidatesByReorder`,
    :func:`scalegrad.hf.reorder_cache`). ``tree`` forces one way.

    When the model's logits are its last hidden state times its output embedding
    (:func:`scalegrad.hf.check_linear_head`: GPT-2 and most causal LMs), the K
    candidates go through the base model only and the output embedding is applied
    to the chosen rows alone (K times fewer vocabulary projections); otherwise the
    whole model runs on every candidate.
    """

    def __init__(self, model, tree: bool | None = None):
        self.model = model
        self.extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
        self.tree = tree
        self.cache = None
        self.mask = None
        self.next_position = None
        self.base = self.head = None
        self.last = None  # per row: the last hidden state (with a linear head) or logits
        self.visible = None  # tree: (B, cache length) bool, the entries later tokens may see
        self.candidate_last = None

    def start(self, prefixes: torch.Tensor, mask: torch.Tensor | None = None):
        """Read the left-padded ``prefixes`` (``mask``: ``None`` when there is no
        padding); returns the last position's logits ``(B, V)``, the final hidden
        states ``(B, P, E)`` and their mask (``None`` without padding)."""
        self.base, self.head, tree = _model_structure(self.model, prefixes[:1, -4:])
        if self.tree is None:
            self.tree = tree
        inputs = {}
        if mask is not None:
            mask64 = mask.to(torch.int64)
            inputs = {"attention_mask": mask64,
                      "position_ids": (mask64.cumsum(dim=1) - 1).clamp(min=0)}
            self.next_position = mask64.sum(dim=1, keepdim=True)
            if not self.tree:  # the tree's own mask is ``visible``
                self.mask = mask64
        output = self.model(input_ids=prefixes, use_cache=True, output_hidden_states=True,
                            **{cache_argument(self.model): None}, **inputs, **self.extra)
        self.cache = returned_cache(output)
        if self.tree:
            self.visible = (mask.bool() if mask is not None
                            else torch.ones_like(prefixes, dtype=torch.bool))
            if self.next_position is None:
                self.next_position = torch.full((prefixes.size(0), 1), prefixes.size(1),
                                                dtype=torch.int64, device=prefixes.device)
        return output.logits[:, -1, :], output.hidden_states[-1], mask

    def candidates(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tree:
            return super().candidates(ids)
        rows, top_k = ids.shape
        visible = torch.cat([self.visible[:, None, :].expand(rows, top_k, -1),
                             torch.eye(top_k, dtype=torch.bool, device=ids.device).expand(rows, -1, -1)],
                            dim=2)
        hidden, last = _forward_tree(self.model, self.base if self.head is not None else None,
                                     ids, visible, self.next_position.expand(rows, top_k), self.cache)
        self.candidate_last = last
        return hidden

    def choose(self, best: torch.Tensor) -> None:
        if not self.tree:
            return super().choose(best)
        top_k = self.candidate_last.size(1)
        self.visible = torch.cat([self.visible, F.one_hot(best, top_k).bool()], dim=1)
        self.next_position = self.next_position + 1
        self.last = self.candidate_last[torch.arange(best.size(0), device=best.device), best]
        self.candidate_last = None

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache = reorder_cache(self.cache, rows)
        if self.last is not None:
            self.last = self.last[rows]
        if self.mask is not None:
            self.mask = self.mask[rows]
            self.next_position = self.next_position[rows]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = {}
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(tokens.size(0), 1)], dim=1)
            inputs = {"attention_mask": self.mask, "position_ids": self.next_position}
            self.next_position = self.next_position + 1
        if self.head is not None:
            output = self.base(input_ids=tokens, use_cache=True,
                               **{cache_argument(self.base): self.cache}, **inputs)
            hidden = output.last_hidden_state[:, -1, :]
            self.last = hidden
        else:
            output = self.model(input_ids=tokens, use_cache=True, output_hidden_states=True,
                                **{cache_argument(self.model): self.cache}, **inputs, **self.extra)
            hidden = output.hidden_states[-1][:, -1, :]
            self.last = output.logits[:, -1, :]
        self.cache = returned_cache(output)
        return hidden

    def next_logits(self) -> torch.Tensor:
        return self.head(self.last) if self.head is not None else self.last


_STRUCTURE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_structure(model, probe_ids: torch.Tensor):
    """``(base, head, tree)`` for :class:`HFStepper`: :func:`scalegrad.hf.check_linear_head`'s
    parts (``None, None`` when the check fails) and :func:`tree_candidates_work`,
    checked once per model, dtype, device and attention implementation (a run
    that continues one prefix at a time does not repeat the checks per prefix)."""
    key = (next(model.parameters()).dtype, model_device(model),
           getattr(getattr(model, "config", None), "_attn_implementation", None))
    known = _STRUCTURE.setdefault(model, {})
    if key not in known:
        try:
            base, head = check_linear_head(model, probe_ids)
        except ValueError:
            base = head = None
        known[key] = (base, head, tree_candidates_work(model))
    return known[key]


def _forward_tree(model, base, ids: torch.Tensor, visible: torch.Tensor, positions: torch.Tensor,
                  cache):
    """Feed ``ids`` ``(B, N)`` on ``cache`` under ``visible`` ``(B, N, cache length +
    N)`` (``True``: the query may attend to that entry) at ``positions`` ``(B, N)``;
    the cache is extended in place (a ``Cache`` object). Returns the final hidden
    states ``(B, N, E)`` and what :meth:`HFStepper.next_logits` needs per token:
    the same hidden states when ``base`` (the model without its linear head) is
    given, else the logits ``(B, N, V)``."""
    dtype = next(model.parameters()).dtype
    additive = torch.zeros(visible.shape, dtype=dtype, device=ids.device)
    additive = additive.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
    inputs = {"input_ids": ids, "attention_mask": additive, "position_ids": positions,
              "use_cache": True}
    if base is not None:
        output = base(**inputs, **{cache_argument(base): cache})
        return output.last_hidden_state, output.last_hidden_state
    output = model(**inputs, output_hidden_states=True, **{cache_argument(model): cache})
    return output.hidden_states[-1], output.logits


def tree_candidates_work(model, rtol: float | None = None) -> bool:
    """Does ``model`` honour a custom 4D attention mask and position ids with its
    key/value cache, as :class:`HFStepper`'s tree candidates need? Checked on
    three tokens, two candidates after them and one token after the second
    candidate (the first masked out), against plain forward passes without a
    cache; ``False`` on any error or a difference beyond ``rtol`` (float32:
    1e-4; half precision: 2e-2) of the hidden states' scale."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 6:
        return False
    if getattr(model.config, "sliding_window", None):
        return False  # one custom mask for every layer would drop the window
    device = model_device(model)
    dtype = next(model.parameters()).dtype
    if rtol is None:
        rtol = 1e-4 if dtype == torch.float32 else 2e-2
    tensor = lambda values: torch.tensor(values, device=device)  # noqa: E731
    try:
        with torch.inference_mode():
            output = model(input_ids=tensor([[1, 2, 3]]), use_cache=True,
                           **{cache_argument(model): None})
            cache = returned_cache(output)
            visible = tensor([[[True] * 3 + [True, False], [True] * 3 + [False, True]]])
            tree, _ = _forward_tree(model, None, tensor([[4, 5]]), visible, tensor([[3, 3]]), cache)
            visible = tensor([[[True] * 3 + [False, True, True]]])
            after, _ = _forward_tree(model, None, tensor([[1]]), visible, tensor([[4]]), cache)
            plain = model(input_ids=tensor([[1, 2, 3, 4], [1, 2, 3, 5]]), output_hidden_states=True)
            plain_after = model(input_ids=tensor([[1, 2, 3, 5, 1]]), output_hidden_states=True)
    except Exception:  # noqa: BLE001 - any failure means: use the copied caches
        return False
    expected = torch.cat([plain.hidden_states[-1][:, -1], plain_after.hidden_states[-1][:, -1]])
    got = torch.cat([tree[0], after[0]]).float()
    expected = expected.float()
    scale = float(expected.abs().max()) or 1.0
    return got.shape == expected.shape and bool((got - expected).abs().max() <= rtol * scale)
