"""ScaleGrad (Lin, Han and Joty, ICML 2021): a library and a fairseq ``--user-dir`` plugin.

The core (``losses``, ``unlikelihood``, ``metrics``, ``generation``, ``data``,
``gpt2``) needs only torch, transformers, numpy and nltk. The fairseq criteria,
tasks and architectures are registered here when fairseq can be imported, so
``fairseq-train --user-dir scalegrad --criterion scalegrad`` works, and the
GPT-2 driver still runs where fairseq is not installed.

Imports inside the package are relative, so the same folder works pip-installed,
as ``--user-dir``, and copied into a fairseq checkout under another name.
"""

import importlib.util
import logging
import os

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

FAIRSEQ_AVAILABLE = False


def _register_fairseq_components() -> bool:
    """Import (and so register) the fairseq components if fairseq imports."""
    if os.environ.get("SCALEGRAD_SKIP_FAIRSEQ") == "1":
        return False
    if importlib.util.find_spec("fairseq") is None:
        return False
    try:
        import fairseq  # noqa: F401
    except Exception as exc:  # a broken fairseq install must not break the core
        logger.warning("fairseq is installed but does not import (%s); "
                       "the fairseq criteria and tasks are not registered", exc)
        return False
    from . import criterions, models, tasks  # noqa: F401  (registration side effects)
    return True


FAIRSEQ_AVAILABLE = _register_fairseq_components()
