#!/usr/bin/env python
"""Generations -> the 2022 papers' metrics (rep-n, diversity, MAUVE, coherence) as JSON.

    python scripts/score_generations.py --generations gens.txt --output scores.json

Installed, the same command is ``scalegrad-score``; the logic lives in
``scalegrad.scoring`` (see docs/metrics-2022.md).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalegrad.score_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
