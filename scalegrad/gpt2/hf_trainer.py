"""ScaleGrad with the Hugging Face ``transformers.Trainer``.

For users who train with ``Trainer`` rather than ``scripts/run_gpt2.py``: pass
:class:`ScaleGradLoss` as the Trainer's ``compute_loss_func`` (its loss hook),
or build the Trainer with :func:`scalegrad_trainer`::

    from transformers import Trainer, TrainingArguments
    from scalegrad.gpt2.hf_trainer import ScaleGradLoss

    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=dataset,
                      data_collator=collator, compute_loss_func=ScaleGradLoss(gamma=0.2))
    trainer.train()

The batches are the usual causal-LM ones: ``input_ids`` and ``labels`` (a copy
of the inputs, ``-100`` where padded, as ``DataCollatorForLanguageModeling(mlm=False)``
makes them). The labels are shifted by one inside, as the models' own loss does,
and every row is its own sequence for the novel-token sets. The Trainer needs
``accelerate`` installed.
"""

from __future__ import annotations

import torch

from ..losses import check_gamma, scalegrad_loss

IGNORE_INDEX = -100


class ScaleGradLoss:
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``Trainer``.

    Returns the summed ScaleGrad loss of the shifted labels divided by
    ``num_items_in_batch`` when the Trainer gives it (the number of scored
    tokens over the whole accumulated batch, so gradient accumulation is exact),
    else by the number of scored tokens in this batch (a per-token mean, the
    driver's normalisation for one chunk).
    """

    def __init__(self, gamma: float, *, ignore_index: int = IGNORE_INDEX):
        self.gamma = check_gamma(gamma)
        self.ignore_index = ignore_index

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if labels is None:
            raise ValueError("ScaleGradLoss needs labels in the batch (a copy of input_ids, "
                             "-100 where padded)")
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits[:, :-1, :]
        target = labels[:, 1:].to(logits.device)
        loss = scalegrad_loss(logits, target, self.gamma, ignore_index=self.ignore_index)
        if num_items_in_batch is None:
            denominator = (target != self.ignore_index).sum().clamp(min=1)
        else:
            denominator = num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(loss.device)
        return loss / denominator

    def __repr__(self) -> str:
        return f"ScaleGradLoss(gamma={self.gamma})"


def scalegrad_trainer(*, gamma: float, **trainer_kwargs):
    """``transformers.Trainer(compute_loss_func=ScaleGradLoss(gamma), **trainer_kwargs)``."""
    from transformers import Trainer

    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError("scalegrad_trainer sets compute_loss_func itself")
    trainer_kwargs["compute_loss_func"] = ScaleGradLoss(gamma)
    return Trainer(**trainer_kwargs)
