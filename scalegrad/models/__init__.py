"""fairseq architectures and models; imported (and so registered) by the package __init__.

Every module of this folder is imported, as fairseq's own ``--user-dir``
loading does for ``models/`` and ``tasks/``, so a new file registers
itself whether the package is pip-installed or used as a user dir.
"""

import importlib
import os

for _file in sorted(os.listdir(os.path.dirname(__file__))):
    if _file.endswith(".py") and not _file.startswith("_"):
        importlib.import_module("." + _file[: -len(".py")], __name__)
del _file
