"""``run_gpt2.py --mode train --objective candidate_penalty_cross_entropy --rank-alpha A``:
token-level unlikelihood in the GPT-2 driver. The step equals a dense re-derivation on a
chunk with repeats (and on token id 0), training lowers it and records it, and bad
flags are one error line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scalegrad.errors import UserError
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.objectives import StepModel, objective_description, training_report
from scalegrad.gpt2.options import parse_args
from scalegrad.gpt2.runtime import Runtime
from tests import helpers
from tests.test_run_gpt2_train import make_data_base, train_argv

CPU = Runtime(device=torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def small_data_base(tiny_data_base, tmp_path_factory):
    return make_data_base(tiny_data_base, tmp_path_factory.mktemp("ul_data"),
                          {"train": 1200, "valid": 1300, "test": 1300})


def dense_token_ul(logits: torch.Tensor, target: torch.Tensor, alpha: float) -> torch.Tensor:
    """NLL + alpha * sum over positions t and distinct earlier targets c != target[t] of
    -log(max(1 - p_t(c), 1e-5)), by loops over positions (mean over the positions)."""
    probs = logits.float().softmax(-1)
    total = F.cross_entropy(logits.float(), target, reduction="sum")
    for t in range(target.numel()):
        for c in set(target[:t].tolist()) - {int(target[t])}:
            total = total + alpha * -torch.log(torch.clamp(1 - probs[t, c], min=1e-5))
    return total / target.numel()


def test_the_step_equals_the_dense_token_unlikelihood(tiny_tokenizer, small_data_base, tmp_path):
    model = helpers.build_tiny_model(len(tiny_tokenizer), seed=5).eval()
    args = parse_args(train_argv(small_data_base, tmp_path / "out", "unused", "--objective",
                                 "candidate_penalty_cross_entropy", "--rank-alpha", 0.7))
    # Repeats, token id 0 at the start and in the middle (no id is padding here).
    chunk = torch.tensor([0, 5, 6, 5, 5, 7, 0, 6, 8, 9, 5, 0, 11, 6, 5, 3, 3])
    loss, log = StepModel(model, args, CPU)(chunk, "candidate_penalty_cross_entropy")
    logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0]
    expected = dense_token_ul(logits, chunk[1:], 0.7)
    nll = F.cross_entropy(logits, chunk[1:])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() > nll.item() + 1e-3  # the penalty is there (small: p(c) is about 1/V)
    assert log["loss"] == pytest.approx(expected.item() * 16, rel=1e-5)
    assert log["nll"] == pytest.approx(nll.item() * 16, rel=1e-5)
    report = training_report([log])
    assert report["nll_loss"] == pytest.approx(nll.item() / math.log(2), rel=1e-5)
    # float32 sums of about 95: the difference is known to about 1e-5
    assert report["ul_loss"] == pytest.approx((expected - nll).item() / math.log(2), abs=2e-5)
    # Gradients too: the step's loss is the dense one.
    model.zero_grad()
    loss.backward()
    step_grad = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    dense_token_ul(model(input_ids=chunk[:-1].unsqueeze(0)).logits[0], chunk[1:], 0.7).backward()
    torch.testing.assert_close(step_grad, model.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6)
    assert objective_description(args) == {"name": "candidate_penalty_cross_entropy", "rank_alpha": 0.7,
                                           "sequence_tune_rate": 0.0}


@pytest.mark.slow  # a short training of the tiny model
def test_training_with_token_unlikelihood_lowers_it(tiny_model_dir, small_data_base, tmp_path):
    from transformers import GPT2LMHeadModel

    from scalegrad.data import load_chunks

    out = tmp_path / "out"
    result = run(parse_args(train_argv(small_data_base, out, tiny_model_dir,
                                       "--objective", "candidate_penalty_cross_entropy",
                                       "--train-n-steps", 30, "--exact-train-n-steps",
                                       "--validate-every", 1000, "--save-every", 1000,
                                       "--report-metrics-every", 6)))
    assert result.train.status == "finished" and result.train.total_steps == 30
    assert result.train.last_report["ul_loss"] > 0
    chunks = load_chunks(small_data_base, "train", 32)[:8]

    def mean_loss(folder):
        model = GPT2LMHeadModel.from_pretrained(folder).eval()
        with torch.no_grad():
            return sum(dense_token_ul(model(input_ids=c[:-1].unsqueeze(0)).logits[0], c[1:], 1.0).item()
                       for c in chunks) / len(chunks)

    assert mean_loss(out) < mean_loss(tiny_model_dir) - 0.05


@pytest.mark.parametrize("extra, message", [
    (("--rank-alpha", -1), "--rank-alpha must be a number >= 0"),
    (("--gamma", 0.5), "--gamma 0.5 is ScaleGrad's"),
    (("--fused-loss",), "--fused-loss computes ScaleGrad or the contrastive-token objective"),
])
def test_bad_flags_are_one_error(small_data_base, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        parse_args(train_argv(small_data_base, tmp_path / "out", "unused", "--objective",
                              "candidate_penalty_cross_entropy", *extra))
