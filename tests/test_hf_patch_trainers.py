"""apply_scalegrad under transformers.Trainer, TRL's SFTTrainer and PEFT LoRA: they train with
ScaleGrad from the model's own loss, the loss falls, and no (batch, time, vocab) tensor is made."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scalegrad import ScaleGradLoss, apply_scalegrad, remove_scalegrad

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

TEXTS = [
    "the cat sat on the mat and the dog sat on the log",
    "a red barn stands near the green hills of the old farm",
    "dogs ran past the barn while the cat slept in the sun",
    "the old farmer fed the hens and then the pigs and the cows",
] * 2


class LogitsCounter(TorchDispatchMode):
    """Counts tensors that some op returns with the vocabulary as last dimension and at
    least ``tokens`` rows: the full logits of a batch of ``tokens`` positions (or its
    gradient), views left out. Parameters ``(vocab, dim)`` and their optimizer states do not count."""

    def __init__(self, vocab: int, tokens: int):
        super().__init__()
        self.vocab, self.tokens, self.full, self.chunks = vocab, tokens, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # weight.t() is no new tensor
            return out
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.vocab:
                rows = tensor.numel() // self.vocab
                self.full += rows >= self.tokens
                self.chunks += rows < self.tokens
        return out


def _tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _llama(tokenizer, tmp_path, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "llama")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "llama")


def _batch(tokenizer):
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _scalegrad_on(model, batch):
    """ScaleGradLoss on the full logits of the model without labels (eval, no grad)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = ScaleGradLoss(0.2)(model(**inputs), batch["labels"]).item()
    model.train(was_training)
    return loss


def test_trainer_trains_the_patched_model_without_full_logits(tiny_model_dir, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = _tokenizer(tiny_model_dir)
    model = _llama(tokenizer, tmp_path)
    batch = _batch(tokenizer)
    before = _scalegrad_on(model, batch)
    apply_scalegrad(model, 0.2, chunk_size=8)
    rows = [{"input_ids": ids} for ids in tokenizer(TEXTS)["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=12, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=4, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    assert trainer.compute_loss_func is None and trainer.model_accepts_loss_kwargs
    counter = LogitsCounter(len(tokenizer), tokens=2 * 8)
    with counter:
        result = trainer.train()
    assert result.global_step == 12
    assert counter.full == 0 and counter.chunks > 0
    after = _scalegrad_on(model, batch)
    assert after < 0.8 * before, (before, after)

    # The model's own loss through the Trainer's call is ScaleGrad's, num_items_in_batch honoured.
    inputs = {**batch, "num_items_in_batch": torch.tensor(50)}
    patched = model(**inputs).loss
    remove_scalegrad(model)
    plain = ScaleGradLoss(0.2)(model(**{k: v for k, v in batch.items() if k != "labels"}), batch["labels"],
                               num_items_in_batch=torch.tensor(50))
    torch.testing.assert_close(patched, plain, rtol=1e-5, atol=0)


def test_sft_trainer_with_the_patch_applied_after_it_is_built(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokenizer = _tokenizer(tiny_model_dir)
    batch = _batch(tokenizer)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=12, per_device_train_batch_size=4,
                     learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no", logging_steps=4,
                     disable_tqdm=True, max_length=64)
    dataset = Dataset.from_dict({"text": TEXTS})

    # The wrong order: SFTTrainer replaces the forward when it is built; the first step says so.
    model = apply_scalegrad(_llama(tokenizer, tmp_path), 0.2)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="apply_scalegrad.*after building the trainer"):
        trainer.train()

    model = _llama(tokenizer, tmp_path)
    before = _scalegrad_on(model, batch)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    apply_scalegrad(trainer.model, 0.2, chunk_size=8)

    # One step's loss and gradients through SFTTrainer.compute_loss are ScaleGradLoss's.
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    plain_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    expected = ScaleGradLoss(0.2)(remove_scalegrad(model)(**plain_inputs), inputs["labels"])
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max().item())
    model.zero_grad(set_to_none=True)
    apply_scalegrad(model, 0.2, chunk_size=8)

    counter = LogitsCounter(len(tokenizer), tokens=4 * 8)
    with counter:
        trainer.train()
    assert counter.full == 0 and counter.chunks > 0
    after = _scalegrad_on(model, batch)
    assert after < 0.8 * before, (before, after)
    logged = [row for row in trainer.state.log_history if "mean_token_accuracy" in row]
    assert logged and all(0 <= row["mean_token_accuracy"] <= 1 and row["entropy"] > 0 for row in logged)


def test_lora_trainer_patched_after_get_peft_model_changes_only_the_adapters(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = _tokenizer(tiny_model_dir)
    batch = _batch(tokenizer)
    model = get_peft_model(_llama(tokenizer, tmp_path),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      lora_dropout=0.0))
    apply_scalegrad(model, 0.2, chunk_size=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    before_weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    before = _scalegrad_on(model, batch)
    rows = [{"input_ids": ids} for ids in tokenizer(TEXTS)["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path / "lora"), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=10, disable_tqdm=True, label_names=["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    counter = LogitsCounter(len(tokenizer), tokens=4 * 8)
    with counter:
        trainer.train()
    assert counter.full == 0 and counter.chunks > 0
    changed = {name for name, p in model.named_parameters() if not torch.equal(before_weights[name], p)}
    assert changed and changed <= trainable and all("lora_" in name for name in changed)
    after = _scalegrad_on(model, batch)
    assert after < before - 0.2, (before, after)
