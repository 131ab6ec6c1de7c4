#!/usr/bin/env python
"""The comparison of training objectives (docs/compare.md): the same as the
``scalegrad-compare`` command.

    python scripts/compare.py [--config configs/compare.yaml] [--output-dir DIR] [--force]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalegrad.gpt2.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
