"""The dense references themselves (tests/references.py) against the original's
outputs, so that what the tests and the benchmarks compare with is the original's
computation (docs/reference.md, section 9)."""

import json
from pathlib import Path

import pytest
import torch

from tests.references import (
    dense_pct_repeat,
    dense_ranking_metrics,
    dense_scalegrad_loss,
    original_scalegrad_loss,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "original_outputs.json").read_text())


def _golden_scalegrad(entry):
    sequence = torch.tensor(entry["sequence"])
    logits = torch.tensor(entry["logits"], requires_grad=True)
    return logits, sequence[1:][None]


@pytest.mark.parametrize("reference", ["loop", "original"])
@pytest.mark.parametrize("case", range(len(GOLDEN["scalegrad"])))
def test_scalegrad_references_match_original_outputs(case, reference):
    entry = GOLDEN["scalegrad"][case]
    logits, target = _golden_scalegrad(entry)
    if reference == "loop":
        loss = dense_scalegrad_loss(logits[None], target, entry["gamma"]).sum()
    else:
        loss = original_scalegrad_loss(logits[None], target, entry["gamma"])
    loss.backward()
    assert loss.item() == pytest.approx(entry["loss_sum"], rel=1e-5)
    torch.testing.assert_close(logits.grad, torch.tensor(entry["grad_of_loss_sum"]),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.2, 0.8, 1.0])
def test_loop_and_vectorised_references_agree_on_batches(gamma):
    g = torch.Generator().manual_seed(int(gamma * 10))
    logits = 3 * torch.randn(3, 13, 9, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (3, 13), generator=g)  # repeats in every row
    loop = dense_scalegrad_loss(logits, target, gamma).sum()
    vectorised = original_scalegrad_loss(logits, target, gamma)
    assert vectorised.item() == pytest.approx(loop.item(), rel=1e-6)


@pytest.mark.parametrize("case", range(len(GOLDEN["ranking"])))
def test_dense_ranking_matches_original_outputs(case):
    entry = GOLDEN["ranking"][case]
    ours = dense_ranking_metrics(torch.tensor(entry["logits"]), torch.tensor(entry["targets"]))
    assert ours == entry["ranking_metrics"]


@pytest.mark.parametrize("case", range(len(GOLDEN["ngram"])))
def test_dense_pct_repeat_matches_original_outputs(case):
    entry = GOLDEN["ngram"][case]
    for n in range(1, 5):
        got = dense_pct_repeat(entry["tokens"], n, pad=entry["pad"])
        assert got == pytest.approx(entry["ngram_metrics"][f"pct_repeat_{n}grams"], abs=1e-12)
