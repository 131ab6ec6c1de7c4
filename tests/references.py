"""Dense, literal re-derivations of docs/reference.md: slow, written to be read.

The library's fast implementations are tested against these (and against the
original's outputs, ``tests/data/original_outputs.json``). The benchmarks measure
:func:`original_scalegrad_loss` as their "dense (original)" baseline, so this module
imports nothing but torch and the standard library, and nothing from ``scalegrad``.

Import as ``from tests.references import name`` (tests and ``benchmarks/run.py``).
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "dense_scalegrad_loss", "original_scalegrad_loss",
    "dense_ranking_metrics", "dense_pct_repeat", "nats_to_bits",
    "original_chunks", "original_prefix_batch", "original_filter_one_row",
    "dense_candidates", "dense_candidate_penalty", "dense_mask_penalty", "dense_ngram_mask",
    "dense_contrastive_token_loss", "dense_simctg_contrastive_loss",
]


# --------------------------------------------------------------------------- #
# Section 1: the ScaleGrad objective
# --------------------------------------------------------------------------- #

def dense_scalegrad_loss(logits, target, gamma, ignore_index=None, eps=1e-8):
    """Section 1, position by position: a dense novel mask over the vocabulary,
    the rescaled and smoothed distribution, L1-normalised. Returns the
    ``(batch, time)`` losses (0 where ``target == ignore_index``; an ignored
    target is not added to the seen set)."""
    batch, time, vocab = logits.shape
    probs = torch.softmax(logits, dim=-1)
    losses = torch.zeros(batch, time, dtype=probs.dtype)
    for b in range(batch):
        seen = set()
        for t in range(time):
            y = int(target[b, t])
            if ignore_index is not None and y == ignore_index:
                continue
            scale = torch.full((vocab,), gamma, dtype=probs.dtype)
            for v in seen:
                scale[v] = 1.0
            numerator = probs[b, t] * scale + eps
            q = numerator / numerator.sum()
            losses[b, t] = -torch.log(q[y])
            seen.add(y)
    return losses


def original_scalegrad_loss(logits, target, gamma, eps=1e-8):
    """Section 1 as the original code computes it, vectorised: a dense
    ``(B, T, V)`` count of the previous targets, the novel mask, dense rescaled
    copies of the distribution, ``F.normalize(p=1)`` and a summed NLL.

    The benchmarks' "dense (original)" baseline; returns the summed loss."""
    batch, time, vocab = logits.shape
    probs = F.softmax(logits, dim=-1)
    counts = torch.zeros(batch, time, vocab, device=logits.device)
    # counts[b, t, v] = occurrences of v in y[b, 0..t-1]
    one_hot = torch.zeros(batch, time, vocab, device=logits.device)
    one_hot.scatter_(2, target.unsqueeze(2), 1.0)
    counts[:, 1:] = one_hot.cumsum(dim=1)[:, :-1]
    novel = counts < 1
    new_probs = probs * novel * gamma + probs * ~novel + eps
    new_probs = F.normalize(new_probs, p=1, dim=-1)
    return F.nll_loss(torch.log(new_probs).view(-1, vocab), target.view(-1), reduction="sum")


# --------------------------------------------------------------------------- #
# Section 2: token-level metrics
# --------------------------------------------------------------------------- #

def dense_ranking_metrics(logits, targets, context_lengths=(16, 32, 128, 512)):
    """Section 2 for one chunk (``(T, V)`` logits), counted position by position."""
    time = targets.numel()
    counts = []
    for t in range(time):
        true = logits[t, targets[t]]
        counts.append(sum(1 for v in range(logits.shape[1]) if logits[t, v] > true))
    ordered = sorted(counts)
    out = {
        "target_rank": float(sum(counts)),
        "hits_at_1": float(sum(c == 0 for c in counts)),
        "hits_at_10": float(sum(c < 10 for c in counts)),
        "median_target_rank": float(ordered[(len(ordered) - 1) // 2]),
        "normalizer": float(time),
    }
    preds = logits.argmax(dim=1).tolist()
    ys = targets.tolist()
    for length in context_lengths:
        rep = wrong = human = 0
        for t in range(time):
            window = ys[max(0, t - length):t]
            rep += preds[t] in window
            wrong += preds[t] in window and preds[t] != ys[t]
            human += ys[t] in window
        out[f"repeat_at_1/{length}"] = float(rep)
        out[f"wrong_repeat_at_1/{length}"] = float(wrong)
        out[f"human_repeat_at_1/{length}"] = float(human)
    return out


def nats_to_bits(x):
    return x / math.log(2)


# --------------------------------------------------------------------------- #
# Section 3: sequence-level metrics and decoding
# --------------------------------------------------------------------------- #

def dense_pct_repeat(tokens, n, pad=None):
    """1 - distinct n-grams / all n-grams, counted by hand."""
    tokens = list(tokens)
    if pad is not None and pad in tokens:
        tokens = tokens[: tokens.index(pad)]
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def original_filter_one_row(logits, top_k=0, top_p=0.0, filter_value=-float("inf")):
    """The original's ``top_k_top_p_filtering``, written out as it is: one
    ``(1, V)`` row, filtered in place."""
    assert logits.size(0) == 1
    logits = logits.squeeze(0)
    top_k = min(top_k, logits.size(-1))
    if top_k > 0:
        indices_to_remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
        logits[indices_to_remove] = filter_value
    if top_p > 0.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        sorted_indices_to_remove = cumulative_probs > top_p
        sorted_indices_to_remove[..., 1:] = sorted_indices_to_remove[..., :-1].clone()
        sorted_indices_to_remove[..., 0] = 0
        indices_to_remove = sorted_indices[sorted_indices_to_remove]
        logits[indices_to_remove] = filter_value
    return logits


# --------------------------------------------------------------------------- #
# Sections 3 and 4: chunks and prefixes
# --------------------------------------------------------------------------- #

def original_chunks(tensor, max_len):
    """The original's ``get_datasets`` for one split: right bound, then
    ``view(-1, max_len + 1)``."""
    right_bound = (tensor.size(0) // (max_len + 1)) * (max_len + 1)
    return tensor[:right_bound].view(-1, (max_len + 1))


def original_prefix_batch(input_sequence, prefix_length):
    """The original's ``batch_input_sequence_by_prefix_length``, for a ``(1, L)`` batch."""
    seq_len = input_sequence.size(1)
    new_seq_len = (seq_len // prefix_length) * prefix_length
    return input_sequence[:, :new_seq_len].view(-1, prefix_length).contiguous()


# --------------------------------------------------------------------------- #
# Section 6: unlikelihood (python loops)
# --------------------------------------------------------------------------- #

def dense_candidates(target, *, pad, row_length=None, ignore_padding=False):
    """Per position, the candidate set: the previous targets (same row, or the
    whole flattened batch) minus the current target. The original also makes
    the padding id a candidate everywhere and scores padding positions."""
    target = [int(t) for t in target]
    n = len(target)
    row_length = row_length or n
    out = []
    for i in range(n):
        start = i // row_length * row_length
        if ignore_padding and target[i] == pad:
            out.append(set())
            continue
        cands = {target[j] for j in range(start, i) if target[j] != pad}
        cands.discard(target[i])
        if not ignore_padding:
            cands.add(pad)
        out.append(cands)
    return out


def dense_candidate_penalty(lprobs, target, *, pad, row_length=None, ignore_padding=False):
    """``(nll, penalty)`` of token-level unlikelihood, summed in python floats."""
    nll = 0.0
    penalty = 0.0
    for i, cands in enumerate(dense_candidates(target, pad=pad, row_length=row_length,
                                               ignore_padding=ignore_padding)):
        if int(target[i]) != pad:
            nll -= float(lprobs[i, int(target[i])])
        for c in cands:
            p = math.exp(float(lprobs[i, c]))
            penalty -= math.log(max(1.0 - p, 1e-5))
    return nll, penalty


def dense_mask_penalty(lprobs, target, *, pad, row_length=None, ignore_padding=False):
    """The same loss through a dense (N, V) candidate mask, for gradients."""
    mask = torch.zeros_like(lprobs)
    for i, cands in enumerate(dense_candidates(target, pad=pad, row_length=row_length,
                                               ignore_padding=ignore_padding)):
        for c in cands:
            mask[i, c] = 1.0
    valid = (target != pad).to(lprobs.dtype)
    nll = -(lprobs.gather(1, target.unsqueeze(1)).squeeze(1) * valid).sum()
    penalty = (-torch.log(torch.clamp(1.0 - lprobs.exp(), min=1e-5)) * mask).sum()
    return nll, penalty


def dense_ngram_mask(tokens, n, *, check_last=False):
    """Mark every token of an N-gram that already occurred earlier in the row;
    the original does not look at the N-gram that starts at T - n."""
    out = []
    for row in tokens:
        row = list(row)
        marks = [0] * len(row)
        starts = range(len(row) - n + (1 if check_last else 0))
        for j in starts:
            gram = row[j:j + n]
            if any(row[k:k + n] == gram for k in range(j)):
                for m in range(j, j + n):
                    marks[m] = 1
        out.append(marks)
    return out


# --------------------------------------------------------------------------- #
# docs/objectives.md: the contrastive-token loss and SimCTG's contrastive term
# --------------------------------------------------------------------------- #

def dense_contrastive_token_loss(logits, target, *, positions, negatives, ignore_index=-100,
                                 pad_id=0):
    """CT position by position: for the first ``positions`` positions of every row whose
    target is neither ``ignore_index`` nor ``pad_id``, the negatives are the targets of
    the ``negatives`` positions before it (as a list: duplicates kept) that are neither
    ignored, ``pad_id`` nor the target itself; the term is ``log(1 + sum exp(z_n - z_y))``.
    Returns the mean over the scored positions (a Python float sum / count)."""
    batch = logits.shape[0]
    total, count = 0.0, 0
    for b in range(batch):
        row = [int(y) for y in target[b, :positions]]
        for t, y in enumerate(row):
            if y == ignore_index or y == pad_id:
                continue
            count += 1
            negative_ids = [n for n in row[max(0, t - negatives):t]
                            if n != ignore_index and n != pad_id and n != y]
            total = total + torch.log(1 + sum((logits[b, t, n] - logits[b, t, y]).exp()
                                               for n in negative_ids)) if negative_ids else total
    return total / count


def dense_simctg_contrastive_loss(hidden, valid, margin):
    """SimCTG's term pair by pair: over rows ``b`` and real positions ``i != j``,
    ``max(0, margin - (cos(h_i, h_i) - cos(h_i, h_j)))``, divided by the number of pairs."""
    total, pairs = 0.0, 0
    for b in range(hidden.shape[0]):
        real = [i for i in range(hidden.shape[1]) if bool(valid[b, i])]
        for i in real:
            for j in real:
                if i == j:
                    continue
                gold = F.cosine_similarity(hidden[b, i], hidden[b, i], dim=0, eps=0.0)
                other = F.cosine_similarity(hidden[b, i], hidden[b, j], dim=0, eps=0.0)
                total = total + torch.clamp(margin - (gold - other), min=0.0)
                pairs += 1
    return total / pairs
