#!/usr/bin/env python
"""Finetune and evaluate a causal LM with ScaleGrad, as the paper's run_gpt2.py.

    python scripts/run_gpt2.py --mode train --data-base DIR --output-dir OUT --eval-split valid \
        --gamma 0.2 ...
    python scripts/run_gpt2.py --mode eval-both --data-base DIR --output-dir OUT \
        --eval-split test --model-load-dir OUT/best

Run it under ``torchrun --nproc_per_node N`` for data parallel training. See
docs/gpt2-driver.md for every flag, the output files and the differences from
the original. The command line is ``scalegrad.gpt2.run_gpt2.main``, which the
package also carries as ``gpt2/run_gpt2.py`` for the original's install-by-copy.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad.gpt2.run_gpt2 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
