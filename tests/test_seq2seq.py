"""The Trainer hook on an encoder-decoder model (a tiny BART built here): labels not shifted."""

from __future__ import annotations

import pytest
import torch

from scalegrad import ScaleGradLoss, scalegrad_trainer
from tests.references import dense_scalegrad_loss


def _tokenizer(tiny_tokenizer_dir):
    from scalegrad.tokenization import load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A seeded random 1+1-layer BART (d_model 32) over the tiny BPE, saved with save_pretrained."""
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = _tokenizer(tiny_tokenizer_dir)
    eos = tokenizer.eos_token_id
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=eos,
                        bos_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos,
                        forced_eos_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bart") / "model"
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _reversal_pairs(tokenizer, n=8):
    """Short source texts and their word-reversed targets, tokenized (no padding)."""
    words = "the cat sat on a mat while dogs ran past old red barns near green hills".split()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (1,), generator=generator))
        picked = [words[int(i)] for i in torch.randint(0, len(words), (length,), generator=generator)]
        rows.append({"input_ids": tokenizer(" ".join(picked))["input_ids"],
                     "labels": tokenizer(" ".join(reversed(picked)))["input_ids"]})
    return rows


def _batch(tokenizer, model, rows):
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, model=model, return_tensors="pt")(rows)


def test_encoder_decoder_loss_is_scalegrad_on_the_unshifted_labels(bart_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bart_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(bart_dir).double()
    batch = _batch(tokenizer, model, _reversal_pairs(tokenizer, 4))
    labels = batch.pop("labels")
    assert (labels == -100).any(), "the rows should differ in length, so some labels are padding"
    outputs = model(**batch)
    assert outputs.logits.shape[:2] == labels.shape

    loss = ScaleGradLoss(0.2)(outputs, labels)  # detected from encoder_last_hidden_state
    dense = dense_scalegrad_loss(outputs.logits.detach(), labels, 0.2, ignore_index=-100)
    expected = dense.sum() / (labels != -100).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert ScaleGradLoss(0.2, shift_labels=False)(outputs, labels).item() == pytest.approx(loss.item(), rel=1e-12)
    # Shifted (the causal-LM reading) would score each position against the next target: different.
    shifted = dense_scalegrad_loss(outputs.logits.detach()[:, :-1], labels[:, 1:], 0.2, ignore_index=-100)
    assert abs(shifted.sum() / (labels[:, 1:] != -100).sum() - loss).item() > 1e-3

    # gamma = 1 is the model's own cross-entropy on the same labels (up to the 1e-8 smoothing).
    own = model(**batch, labels=labels).loss
    assert ScaleGradLoss(1.0)(outputs, labels).item() == pytest.approx(own.item(), rel=1e-6)


def test_seq2seq_trainer_lowers_the_scalegrad_loss(bart_dir, tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              Seq2SeqTrainer, Seq2SeqTrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(bart_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(bart_dir)
    rows = _reversal_pairs(tokenizer, 8)
    hook = ScaleGradLoss(0.2)

    def loss_on_all_rows():
        model.eval()
        batch = _batch(tokenizer, model, rows)
        labels = batch.pop("labels")
        with torch.no_grad():
            return hook(model(**batch), labels).item()

    before = loss_on_all_rows()
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "s2s"), max_steps=30, per_device_train_batch_size=4,
                                    learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                                    logging_steps=10, disable_tqdm=True)
    trainer = scalegrad_trainer(gamma=0.2, trainer_class=Seq2SeqTrainer, model=model, args=args,
                                train_dataset=rows,
                                data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
    assert repr(trainer.compute_loss_func) == "ScaleGradLoss(gamma=0.2)"
    result = trainer.train()
    after = loss_on_all_rows()
    assert result.global_step == 30
    assert after < 0.8 * before, (before, after)  # measured: 5.85 -> 4.16


def test_outputs_without_logits_or_without_decoder_inputs_are_refused(bart_dir):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bart_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(bart_dir)
    hook = ScaleGradLoss(0.2)
    labels = torch.tensor([[5, 6, 7, 8, 9]])
    encoder_only = model.get_encoder()(input_ids=torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match=r"cannot read the model's outputs.*last_hidden_state.*"
                                         r"ForConditionalGeneration"):
        hook(encoder_only, labels)
    with pytest.raises(ValueError, match="cannot read the model's outputs.*got a tuple"):
        hook((torch.zeros(1, 5, 3),), labels)
    # No decoder_input_ids in the batch: BART then decodes the source, whose length differs.
    source = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"do not match labels.*DataCollatorForSeq2Seq\(tokenizer, model=model\)"):
        hook(model(input_ids=source), labels)
    with pytest.raises(ValueError, match="shift_labels must be None, True or False"):
        ScaleGradLoss(0.2, shift_labels="no")
