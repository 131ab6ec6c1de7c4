"""The scalegrad criterion's ``--fused-loss`` on fairseq's own transformer language models
(``transformer_lm``, ``transformer_lm_ul``: the decoder's output projection over its
features): the same loss, logging outputs and gradients as the full logits; a real
fairseq-train; an adaptive softmax refused with one line."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("fairseq")

from tests.test_fairseq_plugin import build, data_bin, fairseq_train, losses, valid_sample  # noqa: E402,F401
from tests.test_fused_drivers import loss_and_grads  # noqa: E402


def assert_same_outputs(plain_out, fused_out):
    """Loss, sample size, every logging output and every gradient alike; a gradient that is
    zero up to rounding (the attention keys' bias) is compared on the model's gradient scale."""
    loss_a, size_a, log_a, grads_a = plain_out
    loss_b, size_b, log_b, grads_b = fused_out
    assert size_a == size_b and loss_b.item() == pytest.approx(loss_a.item(), rel=1e-5)
    assert list(log_a) == list(log_b) and log_a["normalizer"] > 0
    for key in log_a:
        assert float(log_b[key]) == pytest.approx(float(log_a[key]), rel=1e-5, abs=1e-9), key
    assert grads_a.keys() == grads_b.keys() and grads_a
    floor = 1e-3 * max(grad.abs().max().item() for grad in grads_a.values())
    for name in grads_a:
        scale = max(grads_a[name].abs().max().item(), floor)
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= 1e-5 * scale, name

ARCHS = {
    "transformer_lm": ["--arch", "transformer_lm", "--share-decoder-input-output-embed"],
    "transformer_lm_ul": ["--arch", "transformer_lm_ul", "--decoder-input-dim", "64",
                          "--decoder-output-dim", "64"],
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_equals_plain_on_fairseq_transformer_lms(data_bin, arch, caplog):
    common = ["--task", "language_modeling", "--criterion", "scalegrad", "--gamma", "0.3", *ARCHS[arch][2:]]
    _, task, model, plain = build(data_bin, *common)
    cfg, _, _, fused = build(data_bin, *common, "--fused-loss", "--fused-chunk-size", "29")
    assert type(model.decoder).__name__ == "TransformerDecoder" and fused.fused_loss
    sample = valid_sample(task, pad_tail=7)
    model.train()
    with caplog.at_level(logging.WARNING):
        expected = loss_and_grads(plain, model, sample)
        got = loss_and_grads(fused, model, sample)
    assert fused._fused_allowed and "ignored" not in caplog.text
    assert_same_outputs(expected, got)


@pytest.mark.slow
def test_fairseq_train_transformer_lm_ul_with_fused_loss(data_bin):
    common = ["--task", "language_modeling", "--criterion", "scalegrad", "--gamma", "0.2",
              *ARCHS["transformer_lm_ul"], "--dropout", "0", "--activation-dropout", "0", "--max-update", "6"]
    _, plain_output, plain = fairseq_train(data_bin, *common)
    _, output, fused = fairseq_train(data_bin, *common, "--fused-loss", "--fused-chunk-size", "100")
    assert "--fused-loss (criterion.fused_loss) ignored" not in output
    values, plain_values = losses(fused), losses(plain)
    assert len(values) == 6 and values[-1] < values[0]
    assert values == pytest.approx(plain_values, rel=2e-3)
    assert float(fused["valid"][-1]["valid_loss"]) == pytest.approx(float(plain["valid"][-1]["valid_loss"]),
                                                                     rel=2e-3)


@pytest.mark.slow
def test_adaptive_softmax_is_refused_with_one_line(data_bin):
    code, output, _ = fairseq_train(
        data_bin, "--task", "language_modeling", "--arch", "transformer_lm", "--criterion", "scalegrad",
        "--adaptive-softmax-cutoff", "200,1000", "--fused-loss", "--max-update", "2", check=False)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "adaptive softmax" in errors[0], (code, errors, output[-2500:])
    assert "Traceback" not in output
