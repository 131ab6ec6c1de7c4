"""The fairseq criteria ``contrastive_token`` and ``simctg`` (docs/objectives.md): their
loss is the core function's on the same batch, they log what the ``scalegrad`` criterion
logs plus their term, and a real ``fairseq-train`` lowers them."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fairseq")

from fairseq.logging import metrics as fairseq_metrics  # noqa: E402

from scalegrad.contrastive import contrastive_token_loss, simctg_contrastive_loss  # noqa: E402
from tests.test_fairseq_plugin import (METRIC_KEYS, assert_metrics_equal, build,  # noqa: E402,F401
                                       data_bin, fairseq_train, losses, valid_sample)


@pytest.mark.parametrize("name, extra", [
    ("contrastive_token", ["--ct-length", "0.5", "--ct-preced-m-negatives", "8"]),
    ("contrastive_token", []),
    ("simctg", ["--simctg-margin", "0.9"]),
])
def test_criterion_is_cross_entropy_plus_the_core_term(data_bin, name, extra):
    _, task, model, criterion = build(data_bin, "--task", "language_modeling", "--criterion", name,
                                      *extra)
    sample = valid_sample(task, pad_tail=5)
    pad = task.target_dictionary.pad()
    model.eval()
    loss, sample_size, log = criterion(model, sample)
    target = sample["target"]
    assert sample_size == sample["ntokens"] == int((target != pad).sum())
    with torch.no_grad():
        if name == "simctg":
            features = model(**sample["net_input"], features_only=True)[0]
            logits = model.decoder.output_layer(features)
            term = simctg_contrastive_loss(features, target != pad, margin=0.9)
        else:
            logits = model(**sample["net_input"])[0]
            ct_length, negatives = (0.5, 8) if extra else (0.25, 0.5)
            term = contrastive_token_loss(logits, target, ignore_index=pad, pad_id=pad,
                                          ct_length=ct_length, preced_m_negatives=negatives)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=pad,
                          reduction="sum")
    assert term.item() > 0.01
    assert float(loss) == pytest.approx(float(nll + term * sample_size), rel=1e-5)
    assert float(log["nll_loss"]) == pytest.approx(float(nll), rel=1e-5)
    term_key = "ct_loss" if name == "contrastive_token" else "simctg_loss"
    assert float(log[term_key]) == pytest.approx(float(term * sample_size), rel=1e-5)
    assert_metrics_equal(log, logits, target, pad)
    # Backward reaches the model (the term's gradient included).
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    with fairseq_metrics.aggregate() as agg:
        criterion.reduce_metrics([log, log])
    smoothed = agg.get_smoothed_values()
    assert smoothed[term_key] == pytest.approx(float(term) / math.log(2), abs=2e-3)
    assert smoothed["ppl"] == pytest.approx(2 ** (float(nll) / sample_size / math.log(2)), rel=1e-2)


@pytest.mark.parametrize("extra, option", [
    (["--criterion", "contrastive_token", "--ct-length", "0"], "--ct-length"),
    (["--criterion", "contrastive_token", "--ct-preced-m-negatives", "-1"], "--ct-preced-m-negatives"),
    (["--criterion", "simctg", "--simctg-margin", "-0.5"], "--simctg-margin"),
])
def test_bad_criterion_options_name_the_option(data_bin, extra, option):
    with pytest.raises(ValueError, match=option):
        build(data_bin, "--task", "language_modeling", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("contrastive_token", ["--ct-length", "1.0", "--ct-preced-m-negatives", "16"]),
    ("simctg", ["--simctg-margin", "0.9"]),
])
def test_fairseq_train_lowers_the_objective(data_bin, name, extra):
    _, _, logs = fairseq_train(data_bin, "--task", "language_modeling", "--arch", "transformer_lm",
                               "--criterion", name, *extra, "--max-update", "10")
    train = logs["train_inner"]
    assert len(train) == 10
    term_key = "ct_loss" if name == "contrastive_token" else "simctg_loss"
    assert {"loss", "nll_loss", "ppl", term_key} | METRIC_KEYS <= set(train[0])
    values = losses(logs)
    assert sum(values[-3:]) < sum(values[:3]), values
    valid = logs["valid"][-1]
    assert {"valid_loss", "valid_nll_loss", "valid_ppl", f"valid_{term_key}"} <= set(valid)
    assert float(valid[f"valid_{term_key}"]) > 0
