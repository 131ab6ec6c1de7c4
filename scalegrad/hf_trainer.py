"""ScaleGrad with the Hugging Face ``transformers.Trainer`` (and the trainers built on it).

For users who train with ``Trainer``, ``Seq2SeqTrainer`` or TRL's ``SFTTrainer``
rather than ``scripts/run_gpt2.py``: pass :class:`ScaleGradLoss` as the trainer's
``compute_loss_func`` (its loss hook), or build a ``Trainer`` with
:func:`scalegrad_trainer`::

    from transformers import Trainer, TrainingArguments
    from scalegrad import ScaleGradLoss

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                      data_collator=collator, compute_loss_func=ScaleGradLoss(gamma=0.2))
    trainer.train()

Causal LMs (GPT-2, Llama, ...): batches carry ``input_ids`` and ``labels`` (a copy of
the inputs, ``-100`` where padded, as ``DataCollatorForLanguageModeling(mlm=False)``
makes them); the labels are shifted by one inside, as the models' own loss does.

Encoder-decoder models (BART, T5, ...): the logits at target position ``t`` already
predict ``labels[:, t]`` (the decoder reads the labels shifted right), so the labels
are not shifted; the novel-token context of each target position is the previous
target tokens of the same row (see docs/reference.md, loss). The hook detects such a
model from its outputs (sequence-to-sequence outputs carry
``encoder_last_hidden_state``), or ``ScaleGradLoss(gamma, shift_labels=False)`` says
so. The trainer removes ``labels`` from the batch before the forward pass when a
loss hook is set, so the batches must carry ``decoder_input_ids``:
``DataCollatorForSeq2Seq(tokenizer, model=model)`` adds them.

Every row is its own sequence for the novel-token sets. The trainers need
``accelerate`` installed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .arguments import require_tensor
from .losses import check_gamma, scalegrad_loss

IGNORE_INDEX = -100


def _is_encoder_decoder_output(outputs: Mapping) -> bool:
    return outputs.get("encoder_last_hidden_state") is not None


class ScaleGradLoss:
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``Trainer``.

    Returns the summed ScaleGrad loss of the target tokens divided by
    ``num_items_in_batch`` when the Trainer gives it (the number of scored
    tokens over the whole accumulated batch, so gradient accumulation is exact),
    else by the number of scored tokens in this batch (a per-token mean, the
    driver's normalisation for one chunk).

    ``shift_labels``: ``None`` (default) shifts the labels by one unless the
    outputs are an encoder-decoder model's; ``True`` / ``False`` forces it.
    """

    def __init__(self, gamma: float, *, shift_labels: bool | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.gamma = check_gamma(gamma)
        if shift_labels not in (None, True, False):
            raise ValueError(f"shift_labels must be None, True or False, not {shift_labels!r}")
        self.shift_labels = shift_labels
        self.ignore_index = ignore_index

    def _logits(self, outputs) -> torch.Tensor:
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            if isinstance(outputs, Mapping):
                got = f"outputs with fields {sorted(outputs.keys())}"
            else:
                got = f"a {type(outputs).__name__}"
            raise ValueError(
                f"ScaleGradLoss cannot read the model's outputs: it needs a `logits` tensor of shape "
                f"(batch, time, vocab) in a dict-like output, got {got}; use a model with a language "
                f"modelling head (...ForCausalLM, ...ForConditionalGeneration) and return_dict=True")
        return logits

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("ScaleGradLoss needs labels in the batch (causal LMs: a copy of input_ids, "
                             "-100 where padded; encoder-decoder models: the target ids)")
        require_tensor(labels, "labels", "ScaleGradLoss", "(batch, time)")
        logits = self._logits(outputs)
        shift = self.shift_labels
        if shift is None:
            shift = not _is_encoder_decoder_output(outputs)
        if tuple(logits.shape[:2]) != tuple(labels.shape):
            hint = ("for an encoder-decoder model the batch needs decoder_input_ids built from the "
                    "labels (DataCollatorForSeq2Seq(tokenizer, model=model))" if not shift else
                    "the labels must be a copy of input_ids")
            raise ValueError(f"ScaleGradLoss: logits of shape {tuple(logits.shape)} do not match labels "
                             f"of shape {tuple(labels.shape)}; {hint}")
        target = labels.to(logits.device)
        if shift:
            logits, target = logits[:, :-1, :], target[:, 1:]
        loss = scalegrad_loss(logits, target, self.gamma, ignore_index=self.ignore_index)
        if num_items_in_batch is None:
            denominator = (target != self.ignore_index).sum().clamp(min=1)
        else:
            denominator = num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(loss.device)
        return loss / denominator

    def __repr__(self) -> str:
        shift = "" if self.shift_labels is None else f", shift_labels={self.shift_labels}"
        return f"ScaleGradLoss(gamma={self.gamma}{shift})"


def scalegrad_trainer(*, gamma: float, trainer_class=None, shift_labels: bool | None = None,
                      **trainer_kwargs):
    """``trainer_class(compute_loss_func=ScaleGradLoss(gamma), **trainer_kwargs)``.

    ``trainer_class`` defaults to ``transformers.Trainer``; pass
    ``transformers.Seq2SeqTrainer`` or ``trl.SFTTrainer`` for those."""
    if trainer_class is None:
        from transformers import Trainer as trainer_class

    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError("scalegrad_trainer sets compute_loss_func itself")
    trainer_kwargs["compute_loss_func"] = ScaleGradLoss(gamma, shift_labels=shift_labels)
    return trainer_class(**trainer_kwargs)
