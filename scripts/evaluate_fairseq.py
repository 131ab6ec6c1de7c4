#!/usr/bin/env python
"""Evaluate fairseq checkpoints of ScaleGrad-finetuned GPT-2 (the unlikelihood module's
``evaluation.py``, ported): single-token metrics, completions, predictions, targets.

    python scripts/evaluate_fairseq.py --checkpoint checkpoints/sg/checkpoint_best.pt \\
        --eval-split valid --output-dir results/sg
    python scripts/evaluate_fairseq.py --model-path checkpoints/sg --ckpt best \\
        --mode completion --beam-size 4 --beam-ngram-block 4 --output-dir results/sg

Result files are named like run_gpt2.py's (``singletoken__*.json``,
``completion__*.json``), so ``scripts/report_metrics.py`` reads both; see the README
(fairseq route). The logic lives in ``scalegrad.fairseq_plugin.evaluation``.
"""

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad.errors import UserError  # noqa: E402
from scalegrad.fairseq_plugin.evaluation import parse_args, run_evaluation  # noqa: E402


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        written = run_evaluation(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    for path in written:
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=logging.INFO)
    sys.exit(main())
