"""ScaleGrad through the Hugging Face Trainer's loss hook (scalegrad.hf_trainer), causal LMs."""

from __future__ import annotations

import pytest
import torch

from scalegrad import ScaleGradLoss, scalegrad_trainer
from tests.references import dense_scalegrad_loss


def test_loss_func_is_the_shifted_scalegrad_loss_per_scored_token():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 7))
    labels[1, 5:] = -100  # padding
    loss = ScaleGradLoss(0.2)({"logits": logits}, labels)
    target = labels[:, 1:]
    dense = dense_scalegrad_loss(logits[:, :-1], target, 0.2, ignore_index=-100)
    expected = dense.sum() / (target != -100).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    # With the Trainer's count over the accumulated batch, that count is the divisor.
    loss = ScaleGradLoss(0.2)({"logits": logits}, labels, num_items_in_batch=torch.tensor(40))
    assert loss.item() == pytest.approx(dense.sum().item() / 40, rel=1e-10)


def test_gamma_one_is_the_models_own_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    outputs = model(input_ids=ids, labels=ids)
    ours = ScaleGradLoss(1.0)(outputs, ids)
    assert ours.item() == pytest.approx(outputs.loss.item(), rel=1e-5)


def test_the_former_import_path_still_works():
    from scalegrad.gpt2 import hf_trainer

    assert hf_trainer.ScaleGradLoss is ScaleGradLoss and hf_trainer.scalegrad_trainer is scalegrad_trainer


def test_causal_outputs_are_shifted_and_mismatched_labels_refused():
    logits = torch.randn(1, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (1, 5))
    outputs = {"logits": logits}
    auto = ScaleGradLoss(0.3)(outputs, labels)
    assert auto.item() == pytest.approx(ScaleGradLoss(0.3, shift_labels=True)(outputs, labels).item(), rel=1e-12)
    unshifted = dense_scalegrad_loss(logits, labels, 0.3).sum() / 5
    assert ScaleGradLoss(0.3, shift_labels=False)(outputs, labels).item() == pytest.approx(unshifted.item(), rel=1e-10)
    assert abs(auto.item() - unshifted.item()) > 1e-3
    with pytest.raises(ValueError, match=r"logits of shape \(1, 5, 7\) do not match labels of shape \(1, 4\); "
                                         r"the labels must be a copy of input_ids"):
        ScaleGradLoss(0.3)(outputs, labels[:, :4])
    with pytest.raises(ValueError, match="needs labels in the batch"):
        ScaleGradLoss(0.3)(outputs, None)


def test_bad_gamma_is_refused():
    with pytest.raises(ValueError, match="gamma must be a number > 0"):
        ScaleGradLoss(0.0)


def test_trainer_trains_with_the_scalegrad_loss(tiny_model_dir, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (8, 24), generator=generator)
    dataset = [{"input_ids": row, "labels": row.clone()} for row in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    calls = []
    trainer = scalegrad_trainer(gamma=0.5, model=model, args=args, train_dataset=dataset)
    real = trainer.compute_loss_func

    def counting(outputs, labels, num_items_in_batch=None):
        loss = real(outputs, labels, num_items_in_batch=num_items_in_batch)
        calls.append(loss.item())
        return loss

    trainer.compute_loss_func = counting
    result = trainer.train()
    assert len(calls) == 3 and all(torch.isfinite(torch.tensor(calls)))
    assert result.global_step == 3
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
