"""Dense, literal re-derivations of ../shared/SPEC.md, written for readability,
not speed. The library's fast implementations are tested against these."""

import math

import torch


def dense_scalegrad_loss(logits, target, gamma, ignore_index=None, eps=1e-8):
    """SPEC section 1, position by position: a dense novel mask over the
    vocabulary, the rescaled and smoothed distribution, L1-normalised."""
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


def dense_ranking_metrics(logits, targets, context_lengths=(16, 32, 128, 512)):
    """SPEC section 2, counted position by position."""
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


def dense_pct_repeat(tokens, n, pad=None):
    """1 - distinct n-grams / all n-grams, counted by hand."""
    tokens = list(tokens)
    if pad is not None and pad in tokens:
        tokens = tokens[: tokens.index(pad)]
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def nats_to_bits(x):
    return x / math.log(2)
