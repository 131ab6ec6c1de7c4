"""``scripts/run_gpt2.py --mode train --objective contrastive_token | simctg``
(docs/objectives.md): the step equals the core functions on the same chunk, training
runs and records its objective, bad flags end in one error line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalegrad import contrastive_token_loss, simctg_loss
from scalegrad.data import load_chunks
from scalegrad.errors import UserError
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.objectives import StepModel, objective_description, training_report
from scalegrad.gpt2.options import parse_args
from scalegrad.gpt2.runtime import Runtime
from tests import helpers
from tests.test_run_gpt2_train import make_data_base, train_argv

CPU = Runtime(device=torch.device("cpu"), progress=False)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data_base(tiny_data_base, tmp_path_factory):
    """36 training chunks of 32 + 1 tokens; 6 validation chunks of 200 + 1."""
    return make_data_base(tiny_data_base, tmp_path_factory.mktemp("objective_data"),
                          {"train": 1200, "valid": 1300, "test": 1300})


def step_args(small_data_base, tmp_path, *extra):
    return parse_args(train_argv(small_data_base, tmp_path / "out", "unused", *extra))


@pytest.mark.parametrize("objective", ["contrastive_token", "simctg"])
def test_the_step_is_cross_entropy_plus_the_core_term(tiny_tokenizer, small_data_base, tmp_path,
                                                      objective):
    model = helpers.build_tiny_model(len(tiny_tokenizer), seed=3).eval()
    args = step_args(small_data_base, tmp_path, "--objective", objective, "--ct-length", 0.5,
                     "--ct-preced-m-negatives", 6, "--simctg-margin", 0.9)
    chunk = load_chunks(small_data_base, "train", 32, model.config.vocab_size)[2]
    loss, log = StepModel(model, args, CPU)(chunk, objective)
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    outputs = model(input_ids=inp, output_hidden_states=True)
    nll = F.cross_entropy(outputs.logits[0], target[0])
    if objective == "contrastive_token":
        term = contrastive_token_loss(outputs.logits, target, pad_id=None, ct_length=0.5,
                                      preced_m_negatives=6)
        expected = nll + term
        assert log["ct_loss"] == pytest.approx(term.item() * 32, rel=1e-5)
    else:
        expected = simctg_loss(outputs.logits, target, outputs.hidden_states[-1], margin=0.9)
        term = expected - nll
        assert log["simctg_loss"] == pytest.approx(term.item() * 32, rel=1e-4)
    assert term.item() > 0.01  # the term is there
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert log["loss"] == pytest.approx(expected.item() * 32, rel=1e-5)
    report = training_report([log])
    assert report["nll_loss"] == pytest.approx(nll.item() / 0.6931471805599453, rel=1e-5)


@pytest.mark.slow  # three short trainings of the tiny model
@pytest.mark.parametrize("objective", ["contrastive_token", "simctg"])
def test_training_with_each_objective_lowers_it_and_records_it(tiny_model_dir, small_data_base,
                                                               tmp_path, objective):
    out = tmp_path / "out"
    # The tiny random model's hidden states are nearly orthogonal (cosines below 0.6): a
    # margin of 0.9 makes SimCTG's term count from the start.
    margin = 0.9
    result = run(parse_args(train_argv(small_data_base, out, tiny_model_dir, "--objective",
                                       objective, "--simctg-margin", margin, "--train-n-steps", 30,
                                       "--exact-train-n-steps", "--validate-every", 30,
                                       "--save-every", 1000, "--report-metrics-every", 6)))
    assert result.train.status == "finished" and result.train.total_steps == 30
    files = list(out.glob("singletoken__*_30.json"))
    assert len(files) == 1
    content = json.loads(files[0].read_text())
    expected = ({"name": "contrastive_token", "ct_length": 0.25, "preced_m_negatives": 0.5}
                if objective == "contrastive_token" else {"name": "simctg", "margin": margin})
    assert content["objective"] == {**expected, "sequence_tune_rate": 0.0}
    report = result.train.last_report
    assert report[{"contrastive_token": "ct_loss", "simctg": "simctg_loss"}[objective]] > 0
    # The objective of the same training chunks falls.
    args = parse_args(train_argv(small_data_base, out, tiny_model_dir, "--objective", objective,
                                 "--simctg-margin", margin))
    chunks = load_chunks(small_data_base, "train", 32, 10_000)[:8]

    def objective_of(folder):
        from transformers import AutoModelForCausalLM

        step = StepModel(AutoModelForCausalLM.from_pretrained(folder).eval(), args, CPU)
        with torch.no_grad():
            return sum(step(chunk, objective)[0].item() for chunk in chunks) / len(chunks)

    before, after = objective_of(tiny_model_dir), objective_of(out)
    assert after < before - 0.1, (before, after)  # measured: 6.03 -> 5.85 (simctg)


def test_objective_description_names_each_objective(small_data_base, tmp_path):
    args = step_args(small_data_base, tmp_path, "--gamma", 0.2, "--sequence-tune-rate", 0.25,
                     "--prefix-length", 8)
    assert objective_description(args) == {"name": "scalegrad", "gamma": 0.2,
                                           "sequence_tune_rate": 0.25, "sequence_ngram_n": 4}
    args = step_args(small_data_base, tmp_path, "--objective", "contrastive_token",
                     "--ct-length", 40, "--ct-preced-m-negatives", 0.25)
    assert objective_description(args) == {"name": "contrastive_token", "ct_length": 40.0,
                                           "preced_m_negatives": 0.25, "sequence_tune_rate": 0.0}


@pytest.mark.parametrize("extra, message", [
    (["--objective", "contrastive_token", "--ct-length", "0"], "--ct-length must be a number > 0"),
    (["--objective", "contrastive_token", "--ct-preced-m-negatives", "-1"],
     "--ct-preced-m-negatives must be a number > 0"),
    (["--objective", "simctg", "--simctg-margin", "-0.1"], "--simctg-margin must be a number >= 0"),
    (["--objective", "contrastive_token", "--fused-loss"],
     "--fused-loss computes ScaleGrad only; it cannot be combined with --objective contrastive_token"),
])
def test_bad_objective_flags_are_refused(small_data_base, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        parse_args(train_argv(small_data_base, tmp_path / "out", tmp_path / "no-model", *extra))


def test_two_objectives_end_in_one_line_and_exit_2(small_data_base, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(small_data_base, out, tmp_path / "no-model", "--objective", "simctg",
                      "--gamma", "0.5")
    completed = subprocess.run([sys.executable, str(REPO / "scripts" / "run_gpt2.py"), *argv],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert lines == ["error: --gamma 0.5 is ScaleGrad's and cannot be combined with --objective "
                     "simctg (which trains with cross-entropy plus its own term); drop --gamma or "
                     "use --objective scalegrad"], lines
    assert not out.exists()
