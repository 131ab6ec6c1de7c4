"""Registration of the fairseq components: import every module of a folder."""

import importlib
import os


def import_all_modules(package: str, folder: str) -> None:
    """Import the subpackage ``package`` (the folder ``folder`` beside this file)
    and every module in it, as fairseq's own ``--user-dir`` loading does for
    ``models/`` and ``tasks/``, so a new file registers itself whether the
    package is pip-installed, a user dir, or a copy under another name."""
    importlib.import_module(package)
    directory = os.path.join(os.path.dirname(os.path.abspath(__file__)), folder)
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py") and not name.startswith("_"):
            importlib.import_module(f"{package}.{name[: -len('.py')]}")
