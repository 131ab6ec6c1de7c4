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

The objectives ScaleGrad is compared with have hooks of the same shape
(``docs/objectives.md``): :class:`ContrastiveTokenLoss` (cross-entropy plus the
contrastive-token term) and :class:`SimCTGLoss` (cross-entropy plus SimCTG's margin loss
on the last hidden states; the model must return its hidden states:
``model.config.output_hidden_states = True``, which :func:`simctg_trainer` sets).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .contrastive import (check_ct_argument, check_margin, contrastive_token_loss,
                          simctg_contrastive_loss)
from .losses import check_gamma, scalegrad_loss

IGNORE_INDEX = -100


def _is_encoder_decoder_output(outputs: Mapping) -> bool:
    return outputs.get("encoder_last_hidden_state") is not None


class _LossHook:
    """What the hooks share: reading the logits, aligning them with the labels (shifted
    by one for causal LMs), and the divisor (``num_items_in_batch`` or the batch's count)."""

    name = "loss hook"

    def __init__(self, *, shift_labels: bool | None, ignore_index: int):
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
                f"{self.name} cannot read the model's outputs: it needs a `logits` tensor of shape "
                f"(batch, time, vocab) in a dict-like output, got {got}; use a model with a language "
                f"modelling head (...ForCausalLM, ...ForConditionalGeneration) and return_dict=True")
        return logits

    def _shift(self, outputs) -> bool:
        if self.shift_labels is None:
            return not _is_encoder_decoder_output(outputs)
        return self.shift_labels

    def _aligned(self, outputs, labels):
        """``(logits, target, labels, shift)``: ``logits[:, t]`` predicts ``target[:, t]``."""
        if labels is None:
            raise ValueError(f"{self.name} needs labels in the batch (causal LMs: a copy of "
                             f"input_ids, -100 where padded; encoder-decoder models: the target ids)")
        logits = self._logits(outputs)
        shift = self._shift(outputs)
        if tuple(logits.shape[:2]) != tuple(labels.shape):
            hint = ("for an encoder-decoder model the batch needs decoder_input_ids built from the "
                    "labels (DataCollatorForSeq2Seq(tokenizer, model=model))" if not shift else
                    "the labels must be a copy of input_ids")
            raise ValueError(f"{self.name}: logits of shape {tuple(logits.shape)} do not match labels "
                             f"of shape {tuple(labels.shape)}; {hint}")
        labels = labels.to(logits.device)
        if shift:
            return logits[:, :-1, :], labels[:, 1:], labels, True
        return logits, labels, labels, False

    def _divide(self, loss: torch.Tensor, target: torch.Tensor, num_items_in_batch):
        if num_items_in_batch is None:
            denominator = (target != self.ignore_index).sum().clamp(min=1)
        else:
            denominator = num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(loss.device)
        return loss / denominator

    def _cross_entropy_plus(self, logits, target, term, num_items_in_batch):
        """``(CE summed + term x scored tokens) / divisor``: ``CE mean + term`` for one
        batch; under gradient accumulation the term is weighted by the batch's share."""
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                              ignore_index=self.ignore_index, reduction="sum")
        scored = (target != self.ignore_index).sum()
        return self._divide(nll + term * scored, target, num_items_in_batch)

    def _repr_shift(self) -> str:
        return "" if self.shift_labels is None else f", shift_labels={self.shift_labels}"


class ScaleGradLoss(_LossHook):
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``Trainer``.

    Returns the summed ScaleGrad loss of the target tokens divided by
    ``num_items_in_batch`` when the Trainer gives it (the number of scored
    tokens over the whole accumulated batch, so gradient accumulation is exact),
    else by the number of scored tokens in this batch (a per-token mean, the
    driver's normalisation for one chunk).

    ``shift_labels``: ``None`` (default) shifts the labels by one unless the
    outputs are an encoder-decoder model's; ``True`` / ``False`` forces it.
    """

    name = "ScaleGradLoss"

    def __init__(self, gamma: float, *, shift_labels: bool | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.gamma = check_gamma(gamma)
        super().__init__(shift_labels=shift_labels, ignore_index=ignore_index)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits, target, _, _ = self._aligned(outputs, labels)
        loss = scalegrad_loss(logits, target, self.gamma, ignore_index=self.ignore_index)
        return self._divide(loss, target, num_items_in_batch)

    def __repr__(self) -> str:
        return f"ScaleGradLoss(gamma={self.gamma}{self._repr_shift()})"


class ContrastiveTokenLoss(_LossHook):
    """``compute_loss_func`` for ``Trainer``: cross-entropy plus the contrastive-token
    term (:func:`scalegrad.contrastive.contrastive_token_loss`), as the CT paper trains.

    On one batch (no gradient accumulation) the loss is ``CE mean + CT``; with
    ``num_items_in_batch`` CE is summed over the accumulated batch and divided by it,
    and each micro-batch's CT by the share of the scored tokens it holds.

    ``pad_id``: ``None`` (default) because the Trainer's labels already mark padding
    with ``-100``; give an id to also leave that id out (``ct-loss``'s ``pad_id``).
    """

    name = "ContrastiveTokenLoss"

    def __init__(self, ct_length: float = 0.25, preced_m_negatives: float = 0.5, *,
                 pad_id: int | None = None, shift_labels: bool | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.ct_length = check_ct_argument(ct_length, "ct_length")
        self.preced_m_negatives = check_ct_argument(preced_m_negatives, "preced_m_negatives")
        self.pad_id = pad_id
        super().__init__(shift_labels=shift_labels, ignore_index=ignore_index)

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits, target, _, _ = self._aligned(outputs, labels)
        ct = contrastive_token_loss(logits, target, ignore_index=self.ignore_index,
                                    pad_id=self.pad_id, ct_length=self.ct_length,
                                    preced_m_negatives=self.preced_m_negatives)
        return self._cross_entropy_plus(logits, target, ct, num_items_in_batch)

    def __repr__(self) -> str:
        return (f"ContrastiveTokenLoss(ct_length={self.ct_length}, "
                f"preced_m_negatives={self.preced_m_negatives}, pad_id={self.pad_id}"
                f"{self._repr_shift()})")


class SimCTGLoss(_LossHook):
    """``compute_loss_func`` for ``Trainer``: SimCTG's ``CE + CL`` (cross-entropy plus the
    margin loss on the cosine similarities of the last hidden states,
    :func:`scalegrad.contrastive.simctg_contrastive_loss`).

    The hidden states come from the model's outputs: ``hidden_states[-1]`` (causal LMs)
    or ``decoder_hidden_states[-1]`` (encoder-decoder models), which the model returns
    when ``model.config.output_hidden_states`` is True (:meth:`prepare` or
    :func:`simctg_trainer` set it). For a causal LM the positions are those of the shifted
    logits (the inputs but the last), real where the label of the input token is not
    ``-100``, as ``simctg`` trains on ``input_ids = tokens[:-1]``.
    """

    name = "SimCTGLoss"

    def __init__(self, margin: float = 0.5, *, shift_labels: bool | None = None,
                 ignore_index: int = IGNORE_INDEX):
        self.margin = check_margin(margin)
        super().__init__(shift_labels=shift_labels, ignore_index=ignore_index)

    @staticmethod
    def prepare(model):
        """Make ``model`` return its hidden states (what this hook reads); returns it."""
        model.config.output_hidden_states = True
        return model

    def _last_hidden_state(self, outputs, shift: bool) -> torch.Tensor:
        key = "hidden_states" if shift else "decoder_hidden_states"
        states = outputs.get(key) if isinstance(outputs, Mapping) else None
        if not states:
            raise ValueError(
                f"SimCTGLoss needs the model's last hidden states, and its outputs carry no "
                f"{key}: set model.config.output_hidden_states = True before training "
                f"(SimCTGLoss.prepare(model) or simctg_trainer do it)")
        return states[-1]

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        logits, target, labels, shift = self._aligned(outputs, labels)
        hidden = self._last_hidden_state(outputs, shift)
        if shift:
            hidden, valid = hidden[:, :-1], labels[:, :-1] != self.ignore_index
        else:
            valid = labels != self.ignore_index
        contrastive = simctg_contrastive_loss(hidden, valid, margin=self.margin)
        return self._cross_entropy_plus(logits, target, contrastive, num_items_in_batch)

    def __repr__(self) -> str:
        return f"SimCTGLoss(margin={self.margin}{self._repr_shift()})"


def _trainer(loss_func, trainer_class, builder: str, trainer_kwargs: dict):
    if trainer_class is None:
        from transformers import Trainer as trainer_class

    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError(f"{builder} sets compute_loss_func itself")
    trainer_kwargs["compute_loss_func"] = loss_func
    return trainer_class(**trainer_kwargs)


def scalegrad_trainer(*, gamma: float, trainer_class=None, shift_labels: bool | None = None,
                      **trainer_kwargs):
    """``trainer_class(compute_loss_func=ScaleGradLoss(gamma), **trainer_kwargs)``.

    ``trainer_class`` defaults to ``transformers.Trainer``; pass
    ``transformers.Seq2SeqTrainer`` or ``trl.SFTTrainer`` for those."""
    return _trainer(ScaleGradLoss(gamma, shift_labels=shift_labels), trainer_class,
                    "scalegrad_trainer", trainer_kwargs)


def simctg_trainer(*, margin: float = 0.5, trainer_class=None, shift_labels: bool | None = None,
                   **trainer_kwargs):
    """``trainer_class(compute_loss_func=SimCTGLoss(margin), **trainer_kwargs)``, with the
    model (``model=``) set to return its hidden states."""
    loss_func = SimCTGLoss(margin, shift_labels=shift_labels)
    if trainer_kwargs.get("model") is not None:
        SimCTGLoss.prepare(trainer_kwargs["model"])
    return _trainer(loss_func, trainer_class, "simctg_trainer", trainer_kwargs)
