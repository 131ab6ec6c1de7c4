"""The fairseq side of scalegrad, in one home: criteria, tasks and architectures
(registered by :func:`register`), checkpoint reading and export
(:mod:`.checkpoints`), and the evaluation of fairseq language models
(:mod:`.evaluation`).

Importing this package imports nothing from fairseq; :func:`register` does,
and the package root calls it whenever fairseq loads scalegrad (``--user-dir``,
``fairseq-hydra-train``, a copy in a fairseq checkout).
"""

from ._registry import import_all_modules

__all__ = ["register"]

_REGISTERED = False


def register() -> None:
    """Import (and so register with fairseq) every criterion, task and model of
    this package. Idempotent; raises ``ImportError`` when fairseq is missing."""
    global _REGISTERED
    if _REGISTERED:
        return
    import argparse

    import fairseq  # noqa: F401  (a clear ImportError when it is missing)
    import torch

    # fairseq records the config of its argparse architectures (``transformer``,
    # ``transformer_lm``, ...) as an argparse.Namespace, which torch >= 2.6 refuses
    # to unpickle under its default torch.load(weights_only=True): fairseq-generate
    # could not load such a checkpoint. A Namespace holds plain attributes: allow it.
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])

    for folder in ("criterions", "tasks", "models"):
        import_all_modules(f"{__name__}.{folder}", folder)
    _REGISTERED = True
