"""The library's public functions (README, "The ScaleGrad loss as a library"): a list
where a tensor is expected, or the reverse, either gives the very same numbers or is
refused with a ValueError naming the shapes taken; never a different number."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scalegrad import (CompletionMetrics, NgramMetrics, ScaleGradLoss, candidate_penalty_loss,
                       fused_linear_scalegrad_loss, ngram_metrics, ranking_metrics, repeat_at_1,
                       scalegrad_loss, sequence_penalty_loss)
from scalegrad.metrics import ngram_metric_sums
from scalegrad.unlikelihood import ngram_repeat_mask


def by_hand_pct_repeat(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@pytest.mark.parametrize("tokens", [[5, 5, 5, 5, 5], [0, 3, 0, 3, 0, 1, 9], [7], [], [1, 2]])
def test_ngram_metrics_list_tensor_and_array_agree(tokens):
    cut = tokens[:tokens.index(1)] if 1 in tokens else tokens  # pad=1 cuts
    expected = {f"pct_repeat_{n}grams": by_hand_pct_repeat(cut, n) for n in range(1, 5)}
    assert ngram_metrics(tokens, pad=1) == pytest.approx(expected)
    for same in (torch.tensor(tokens, dtype=torch.long), tuple(tokens), np.array(tokens, dtype=np.int64),
                 [torch.tensor(t) for t in tokens], torch.tensor(tokens, dtype=torch.int32)):
        assert ngram_metrics(same, pad=1) == ngram_metrics(tokens, pad=1)


def test_ngram_metrics_the_issue_example():
    assert ngram_metrics([5, 5, 5, 5, 5], pad=1)["pct_repeat_1grams"] == pytest.approx(0.8)
    assert ngram_metrics(torch.tensor([5, 5, 5, 5, 5]), pad=1)["pct_repeat_1grams"] == pytest.approx(0.8)


@pytest.mark.parametrize("bad", [torch.tensor([[5, 5], [5, 5]]), torch.tensor(5), [[5, 5], [5]],
                                 "5 5 5", 5, {5: 1}, [torch.tensor([5, 5])]])
def test_ngram_metrics_refuses_anything_else_naming_what_it_takes(bad):
    with pytest.raises(ValueError, match="a list .* of token ids or a 1-D tensor"):
        ngram_metrics(bad)


def test_several_sequences_rows_or_lists_agree():
    rows = [[5, 5, 5, 5], [0, 2, 0, 2], [3, 1, 3, 3]]
    sums = ngram_metric_sums(rows, pad=1)
    assert sums["pct_repeat_1grams"] == pytest.approx(0.75 + 0.5 + 0.0)
    assert ngram_metric_sums(torch.tensor(rows), pad=1) == sums
    assert ngram_metric_sums([torch.tensor(r) for r in rows], pad=1) == sums
    a, b = NgramMetrics(pad=1), NgramMetrics(pad=1)
    a.update(rows)
    b.update(torch.tensor(rows))
    assert a.report() == b.report() and len(a) == 3
    for bad in (torch.tensor([5, 5, 5]), [5, 5, 5], torch.zeros(2, 2, 2)):
        with pytest.raises(ValueError, match="2-D tensor .* or a list of sequences"):
            ngram_metric_sums(bad)
        with pytest.raises(ValueError, match="2-D tensor .* or a list of sequences"):
            NgramMetrics().update(bad)


def test_completion_metrics_list_or_tensor(tiny_tokenizer):
    ids = tiny_tokenizer("the cat sat on the mat and the cat sat on the mat again",
                         add_special_tokens=False)["input_ids"]
    rows = [ids[:12], ids[1:13]]
    a, b = CompletionMetrics(tiny_tokenizer, 4), CompletionMetrics(tiny_tokenizer, 4)
    a.update(rows)
    b.update(torch.tensor(rows))
    assert a.report("valid") == b.report("valid")
    with pytest.raises(ValueError, match="2-D tensor"):
        CompletionMetrics(tiny_tokenizer, 4).update(torch.tensor(ids))


def test_tensor_functions_refuse_lists_naming_the_shape():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    calls = [
        (lambda: scalegrad_loss(logits.tolist(), target, 0.5), "logits must be a torch.Tensor of shape \\(batch, time, vocab\\)"),
        (lambda: scalegrad_loss(logits, target.tolist(), 0.5), "target must be a torch.Tensor of shape \\(batch, time\\)"),
        (lambda: fused_linear_scalegrad_loss(torch.randn(2, 4, 3), torch.randn(6, 3), target.tolist(), 0.5),
         "target must be a torch.Tensor"),
        (lambda: ranking_metrics(logits[0], target[0].tolist()), "targets must be a torch.Tensor of shape \\(T,\\)"),
        (lambda: repeat_at_1(logits[0].tolist(), target[0], 16), "logits must be a torch.Tensor"),
        (lambda: candidate_penalty_loss(logits[0].log_softmax(-1), target[0].tolist(), padding_idx=0),
         "target must be a torch.Tensor of shape \\(N,\\)"),
        (lambda: ngram_repeat_mask(target.tolist(), 2), "tokens must be a torch.Tensor of shape \\(B, T\\)"),
        (lambda: ngram_repeat_mask(target[0], 2), "tokens must be \\(B, T\\)"),
        (lambda: sequence_penalty_loss(logits.log_softmax(-1), target, target.tolist()), "mask must be a torch.Tensor"),
        (lambda: ScaleGradLoss(0.5)({"logits": logits}, target.tolist()), "labels must be a torch.Tensor"),
    ]
    for call, message in calls:
        with pytest.raises(ValueError, match=message):
            call()
    # The same tensors in give the same numbers whatever their integer dtype.
    assert torch.equal(scalegrad_loss(logits, target, 0.5), scalegrad_loss(logits, target.int(), 0.5))
