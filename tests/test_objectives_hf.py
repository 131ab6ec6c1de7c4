"""The Trainer hooks of the contrastive objectives (scalegrad.hf_trainer, docs/objectives.md):
ContrastiveTokenLoss and SimCTGLoss equal the core functions on the same batch, read
what they need from a real tiny model's outputs, and lower the loss through a real
``transformers.Trainer``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalegrad import ContrastiveTokenLoss, SimCTGLoss, contrastive_token_loss, simctg_loss
from scalegrad.hf_trainer import simctg_trainer


def padded_batch(vocab, generator, rows=4, length=20):
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    ids[1, 10:20] = ids[1, :10]  # a repeat
    labels = ids.clone()
    labels[0, -6:] = -100      # right padding, as DataCollatorForLanguageModeling
    labels[3, -1:] = -100
    return ids, labels


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_ct_hook_is_cross_entropy_plus_the_shifted_ct_term(model):
    ids, labels = padded_batch(model.config.vocab_size, torch.Generator().manual_seed(0))
    outputs = model(input_ids=ids)
    hook = ContrastiveTokenLoss(ct_length=0.5, preced_m_negatives=4)
    loss = hook(outputs, labels)
    logits, target = outputs.logits[:, :-1], labels[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
    ct = contrastive_token_loss(logits, target, pad_id=None, ct_length=0.5, preced_m_negatives=4)
    assert ct.item() > 0.05
    assert loss.item() == pytest.approx((nll + ct).item(), rel=1e-6)
    # With the Trainer's count of the accumulated batch: CE summed over it, CT by share.
    scored = int((target != -100).sum())
    loss = hook(outputs, labels, num_items_in_batch=torch.tensor(2 * scored))
    assert loss.item() == pytest.approx((nll + ct).item() / 2, rel=1e-6)
    # pad_id as ct-loss: that id is dropped too.
    with_pad = ContrastiveTokenLoss(0.5, 4, pad_id=int(target[2, 3]))(outputs, labels)
    expected = nll + contrastive_token_loss(logits, target, pad_id=int(target[2, 3]),
                                            ct_length=0.5, preced_m_negatives=4)
    assert with_pad.item() == pytest.approx(expected.item(), rel=1e-6)


def test_simctg_hook_reads_the_last_hidden_states(model):
    ids, labels = padded_batch(model.config.vocab_size, torch.Generator().manual_seed(1))
    hook = SimCTGLoss(margin=0.9)
    with pytest.raises(ValueError, match="SimCTGLoss needs the model's last hidden states, and its "
                                         "outputs carry no hidden_states: set "
                                         r"model.config.output_hidden_states = True"):
        hook(model(input_ids=ids), labels)
    SimCTGLoss.prepare(model)
    try:
        outputs = model(input_ids=ids)  # the config makes the model return them
    finally:
        model.config.output_hidden_states = False
    assert outputs.hidden_states is not None
    loss = hook(outputs, labels)
    # As simctg trains: inputs = ids[:-1], labels = ids[1:], the inputs' hidden states.
    expected = simctg_loss(outputs.logits[:, :-1], labels[:, 1:], outputs.hidden_states[-1][:, :-1],
                           margin=0.9, valid=labels[:, :-1] != -100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    nll = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, outputs.logits.size(-1)),
                          labels[:, 1:].reshape(-1))
    assert loss.item() - nll.item() > 0.01  # the margin term counts


def test_bad_hook_arguments_are_refused():
    with pytest.raises(ValueError, match="^ct_length must be a number > 0"):
        ContrastiveTokenLoss(ct_length=0)
    with pytest.raises(ValueError, match="^preced_m_negatives must be a number > 0"):
        ContrastiveTokenLoss(preced_m_negatives=-1)
    with pytest.raises(ValueError, match="^margin must be a number >= 0"):
        SimCTGLoss(margin=-0.5)
    with pytest.raises(ValueError, match="ContrastiveTokenLoss needs labels"):
        ContrastiveTokenLoss()({"logits": torch.zeros(1, 3, 5)}, None)


@pytest.mark.slow  # two short real Trainer runs
@pytest.mark.parametrize("objective", ["contrastive_token", "simctg"])
def test_trainer_lowers_each_objective(tiny_model_dir, tmp_path, objective):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    ids, labels = padded_batch(model.config.vocab_size, generator, rows=8, length=24)
    dataset = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    if objective == "contrastive_token":
        hook = ContrastiveTokenLoss(ct_length=1.0, preced_m_negatives=8)
    else:
        hook = SimCTGLoss(margin=0.9)

    def objective_value():
        model.eval()
        with torch.no_grad():
            outputs = model(input_ids=ids, output_hidden_states=True)
            value = hook(outputs, labels).item()
        return value

    before = objective_value()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=12, per_device_train_batch_size=4,
                             learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True)
    if objective == "simctg":
        trainer = simctg_trainer(margin=0.9, model=model, args=args, train_dataset=dataset)
        assert model.config.output_hidden_states is True
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, compute_loss_func=hook)
    trainer.train()
    after = objective_value()
    assert after < before - 0.3, (before, after)  # measured: simctg 6.05 -> 5.58
