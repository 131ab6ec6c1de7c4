"""The Trainer hook's former home: :mod:`scalegrad.hf_trainer` (core) holds it now.

Kept so that ``from scalegrad.gpt2.hf_trainer import ScaleGradLoss`` still works."""

from ..hf_trainer import IGNORE_INDEX, ScaleGradLoss, scalegrad_trainer

__all__ = ["IGNORE_INDEX", "ScaleGradLoss", "scalegrad_trainer"]
