"""scalegrad.unlikelihood against literal re-derivations of docs/reference.md, section 6."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalegrad.unlikelihood import (
    candidate_pairs,
    candidate_penalty_loss,
    ngram_repeat_mask,
    sequence_penalty_loss,
)
from tests.references import (
    dense_candidate_penalty,
    dense_mask_penalty,
    dense_ngram_mask,
)

PAD = 1


def random_lprobs(n, v, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=dtype) * 3
    return torch.log_softmax(logits, dim=-1)


# --------------------------------------------------------------------------- #
# Token-level unlikelihood
# --------------------------------------------------------------------------- #

# Two rows of 6: repeats, token 0, padding at the end of row 1 (pad = 1).
TARGET = torch.tensor([4, 0, 4, 5, 0, 7,
                       5, 3, 3, 0, 1, 1])


def test_candidates_hand_counted_flattened():
    pos, cand = candidate_pairs(TARGET, padding_idx=PAD)
    got = [set() for _ in range(TARGET.numel())]
    for p, c in zip(pos.tolist(), cand.tolist()):
        got[p].add(c)
    assert got[0] == set()
    assert got[1] == {4}
    assert got[2] == {0}                 # 4 is the current target
    assert got[3] == {4, 0}
    assert got[6] == {4, 0, 7}           # row 1 sees row 0 (the quirk)
    assert got[8] == {4, 0, 5, 7}        # 3 is the current target
    assert got[11] == {4, 0, 5, 7, 3}    # padding never listed here
    # each candidate once per position
    assert len(pos) == sum(len(s) for s in got)


def test_candidates_hand_counted_per_row():
    pos, cand = candidate_pairs(TARGET, padding_idx=PAD, row_length=6)
    got = [set() for _ in range(TARGET.numel())]
    for p, c in zip(pos.tolist(), cand.tolist()):
        got[p].add(c)
    assert got[6] == set()
    assert got[7] == {5}
    assert got[8] == {5}
    assert got[9] == {5, 3}
    assert got[11] == {5, 3, 0}


@pytest.mark.parametrize("row_length", [None, 6])
@pytest.mark.parametrize("ignore_padding", [False, True])
def test_candidate_penalty_matches_dense(row_length, ignore_padding):
    lprobs = random_lprobs(TARGET.numel(), 9)
    nll, penalty = candidate_penalty_loss(lprobs, TARGET, padding_idx=PAD,
                                          row_length=row_length, ignore_padding=ignore_padding)
    ref_nll, ref_penalty = dense_candidate_penalty(lprobs, TARGET, pad=PAD, row_length=row_length,
                                                   ignore_padding=ignore_padding)
    assert float(nll) == pytest.approx(ref_nll, rel=1e-12)
    assert float(penalty) == pytest.approx(ref_penalty, rel=1e-12)


def test_candidate_penalty_original_counts_padding():
    """With the original's behaviour the padding id is penalised at all 12
    positions, padding positions included; ignore_padding drops that."""
    lprobs = random_lprobs(TARGET.numel(), 9, seed=3)
    _, original = candidate_penalty_loss(lprobs, TARGET, padding_idx=PAD)
    _, fixed = candidate_penalty_loss(lprobs, TARGET, padding_idx=PAD, ignore_padding=True)
    pad_term = -torch.log(torch.clamp(1 - lprobs[:, PAD].exp(), min=1e-5)).sum()
    # the padding positions' (10, 11) own candidates
    extra = 0.0
    for i in (10, 11):
        for c in {4, 0, 5, 7, 3}:
            extra -= math.log(1 - math.exp(float(lprobs[i, c])))
    assert float(original) == pytest.approx(float(fixed + pad_term) + extra, rel=1e-12)


def test_candidate_penalty_gradients_match_dense():
    base = random_lprobs(TARGET.numel(), 9, seed=5, dtype=torch.float32)
    for row_length, ignore_padding in [(None, False), (6, True)]:
        a = base.clone().requires_grad_(True)
        b = base.clone().requires_grad_(True)
        out = candidate_penalty_loss(a, TARGET, padding_idx=PAD, row_length=row_length,
                                     ignore_padding=ignore_padding)
        out.total(0.7).backward()
        nll, pen = dense_mask_penalty(b, TARGET, pad=PAD, row_length=row_length,
                                      ignore_padding=ignore_padding)
        (nll + 0.7 * pen).backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_candidate_penalty_clamp():
    """p(c) = 1 is clamped to -log(1e-5), and the NLL ignores padding."""
    lprobs = torch.full((3, 4), -1e4)
    lprobs[:, 2] = 0.0  # p = 1 for token 2
    target = torch.tensor([2, 3, 1])
    nll, penalty = candidate_penalty_loss(lprobs, target, padding_idx=PAD, ignore_padding=True)
    # position 1 (target 3) has candidate 2 with p = 1; position 2 is padding
    assert float(penalty) == pytest.approx(-math.log(1e-5), rel=1e-6)
    assert float(nll) == pytest.approx(0.0 + 1e4, rel=1e-6)


def test_candidate_penalty_rejects_bad_row_length():
    with pytest.raises(ValueError, match="row_length"):
        candidate_penalty_loss(random_lprobs(12, 5), TARGET % 5, padding_idx=PAD, row_length=5)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 3),
    length=st.integers(1, 7),
    vocab=st.integers(2, 6),
    ignore_padding=st.booleans(),
    per_row=st.booleans(),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_candidate_penalty_property(rows, length, vocab, ignore_padding, per_row, seed, data):
    n = rows * length
    target = torch.tensor(data.draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n)))
    pad = data.draw(st.integers(0, vocab - 1))
    lprobs = random_lprobs(n, vocab, seed=seed)
    row_length = length if per_row else None
    nll, penalty = candidate_penalty_loss(lprobs, target, padding_idx=pad, row_length=row_length,
                                          ignore_padding=ignore_padding)
    ref_nll, ref_penalty = dense_candidate_penalty(lprobs, target, pad=pad, row_length=row_length,
                                                   ignore_padding=ignore_padding)
    assert float(nll) == pytest.approx(ref_nll, rel=1e-9, abs=1e-9)
    assert float(penalty) == pytest.approx(ref_penalty, rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------- #
# Sequence-level unlikelihood
# --------------------------------------------------------------------------- #

def test_ngram_repeat_mask_hand_counted():
    tokens = torch.tensor([[5, 6, 5, 6, 7, 5, 6],
                           [0, 0, 0, 0, 3, 3, 3]])
    # n = 2, row 0: bigrams at 0..5 = 56 65 56 67 75 56; the original checks
    # starts 0..4 only: 56 at 2 repeats -> mark 2,3; the 56 at 5 is never checked.
    expected_row0 = [0, 0, 1, 1, 0, 0, 0]
    # row 1: 00 00 00 03 33 33 -> starts 1, 2 repeat (marks 1..3); 33 at 5 unchecked.
    expected_row1 = [0, 1, 1, 1, 0, 0, 0]
    assert ngram_repeat_mask(tokens, 2).int().tolist() == [expected_row0, expected_row1]
    fixed = ngram_repeat_mask(tokens, 2, check_last=True).int().tolist()
    assert fixed == [[0, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 0, 1, 1]]
    # n = 1: the last token is never checked
    assert ngram_repeat_mask(tokens, 1).int().tolist() == [[0, 0, 1, 1, 0, 1, 0],
                                                           [0, 1, 1, 1, 0, 1, 0]]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=3),
    n=st.integers(1, 4),
    check_last=st.booleans(),
)
def test_ngram_repeat_mask_property(rows, n, check_last):
    tokens = torch.tensor(rows)
    got = ngram_repeat_mask(tokens, n, check_last=check_last).int().tolist()
    assert got == dense_ngram_mask(rows, n, check_last=check_last)


def test_sequence_penalty_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    lprobs = torch.log_softmax(torch.randn(2, 5, 7, generator=g, dtype=torch.float64), -1)
    lprobs[0, 1, 3] = 0.0  # p = 1: clamped at 1e-20
    tokens = torch.tensor([[2, 3, 3, 2, 6], [0, 0, 1, 1, 0]])
    mask = ngram_repeat_mask(tokens, 1, check_last=True)
    mask[0, 1] = True
    ref = 0.0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = math.exp(float(lprobs[b, t, tokens[b, t]]))
                ref -= math.log(max(1.0 - p, 1e-20))
    assert float(sequence_penalty_loss(lprobs, tokens, mask)) == pytest.approx(ref, rel=1e-12)
    # float masks (the "random" candidate type) work the same
    assert float(sequence_penalty_loss(lprobs, tokens, mask.double())) == pytest.approx(ref, rel=1e-12)
