"""fairseq tasks; imported (and so registered) by the package __init__.

Every module of this folder is imported (and so registers itself).
"""

from .._plugin import import_all_modules

import_all_modules(__name__, __file__)
