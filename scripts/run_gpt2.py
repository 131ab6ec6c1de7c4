#!/usr/bin/env python
"""Finetune and evaluate a causal LM with ScaleGrad, as the paper's run_gpt2.py.

    python scripts/run_gpt2.py --mode train --data-base DIR --output-dir OUT --eval-split valid \
        --gamma 0.2 ...
    python scripts/run_gpt2.py --mode eval-both --data-base DIR --output-dir OUT \
        --eval-split test --model-load-dir OUT/best

Run it under ``torchrun --nproc_per_node N`` for data parallel training. See the
README (GPT-2 driver) for every flag, the output files and the differences from
the original. The logic lives in ``scalegrad.gpt2``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad.errors import UserError  # noqa: E402
from scalegrad.gpt2.driver import run  # noqa: E402
from scalegrad.gpt2.options import parse_args  # noqa: E402


def main(argv=None) -> int:
    try:
        result = run(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if result.resume_hint:
        print(result.resume_hint, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
