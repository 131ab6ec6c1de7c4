"""Registration of the fairseq components (imported only when fairseq imports)."""

import importlib
import os


def import_all_modules(package: str, init_file: str) -> None:
    """Import every module of a package folder, as fairseq's own ``--user-dir``
    loading does for ``models/`` and ``tasks/``, so a new file registers itself
    whether the package is pip-installed, a user dir, or a copy under another name."""
    for name in sorted(os.listdir(os.path.dirname(init_file))):
        if name.endswith(".py") and not name.startswith("_"):
            importlib.import_module("." + name[: -len(".py")], package)
