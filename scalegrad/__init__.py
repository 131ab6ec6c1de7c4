"""ScaleGrad (Lin, Han and Joty, ICML 2021): a library and a fairseq ``--user-dir`` plugin.

The core (``losses``, ``contrastive``, ``fused``, ``metrics``, ``generation``, ``data``, ``hf``,
``gpt2``) needs only torch, transformers, numpy and nltk, and importing the
package imports none of them until a name is used:

    from scalegrad import scalegrad_loss, fused_linear_scalegrad_loss, ScaleGradLoss

The fairseq criteria, tasks and architectures (``scalegrad.fairseq_plugin``) are
registered when fairseq loads this package (``fairseq-train --user-dir
scalegrad``, ``fairseq-hydra-train``, a copy in a fairseq checkout: fairseq is
then already imported), or by an explicit :func:`register_fairseq` in a script
that imports fairseq itself. Set ``SCALEGRAD_SKIP_FAIRSEQ=1`` to never register.

Imports inside the package are relative, so the same folder works pip-installed,
as ``--user-dir``, and copied into a fairseq checkout under another name.
"""

import importlib
import os
import sys

__version__ = "0.1.0"

# Public names, imported on first use (PEP 562) so that ``import scalegrad`` is cheap.
_PUBLIC = {
    "scalegrad_loss": ".losses",
    "check_gamma": ".losses",
    "fused_linear_scalegrad_loss": ".fused",
    "ScaleGradLoss": ".hf_trainer",
    "scalegrad_trainer": ".hf_trainer",
    "apply_scalegrad": ".hf_patch",
    "remove_scalegrad": ".hf_patch",
    "scalegrad_patched": ".hf_patch",
    "ranking_metrics": ".metrics",
    "aggregate_ranking_metrics": ".metrics",
    "repeat_at_1": ".metrics",
    "ngram_metrics": ".metrics",
    "NgramMetrics": ".metrics",
    "CompletionMetrics": ".metrics",
    "candidate_penalty_loss": ".unlikelihood",
    "sequence_penalty_loss": ".unlikelihood",
    "contrastive_token_loss": ".contrastive",
    "simctg_loss": ".contrastive",
    "ContrastiveTokenLoss": ".hf_trainer",
    "SimCTGLoss": ".hf_trainer",
    "simctg_trainer": ".hf_trainer",
}

__all__ = ["__version__", "register_fairseq", "fairseq_registered", *_PUBLIC]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def register_fairseq() -> None:
    """Register the fairseq criteria, tasks and architectures (idempotent).

    Raises ``ImportError`` when fairseq is not installed (``pip install
    "scalegrad[fairseq]"``)."""
    from .fairseq_plugin import register

    try:
        register()
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != "fairseq":
            raise
        raise ModuleNotFoundError('fairseq is not installed: pip install "scalegrad[fairseq]" '
                                  "(or bash scripts/setup_env.sh)", name=error.name) from error


def fairseq_registered() -> bool:
    """Have the fairseq components been registered in this process?"""
    plugin = sys.modules.get(__name__ + ".fairseq_plugin")
    return bool(plugin is not None and getattr(plugin, "_REGISTERED", False))


# fairseq is loading this package (or was imported first): register with it.
if "fairseq" in sys.modules and os.environ.get("SCALEGRAD_SKIP_FAIRSEQ") != "1":
    register_fairseq()
