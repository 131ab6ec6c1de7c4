#!/usr/bin/env python
"""Result files -> the paper's table (text, CSV, Markdown) and plots.

    python scripts/report_metrics.py RUN_DIR [RUN_DIR ...] [--names N ...] \
        [--train-dirs DIR ...] [--output-dir OUT] [--format text|csv|markdown]
    python scripts/report_metrics.py --eval-dirs DIR [DIR ...] [--model-names NAME ...]

Each RUN_DIR holds the JSON results of ``run_gpt2.py --mode eval-*`` (or
``evaluate_fairseq.py --result-format gpt2``); one row per run and decoding
setting. ``--eval-dirs`` reads the files of ``evaluate_fairseq.py`` (the original
evaluation script's completions_, single_token_predictions_, targets_ and
metrics_ files) as the original report script did, for each of
``--model-names`` (default: every model found). Both can be given together. With
``--output-dir`` it writes ``report.md``, ``report.csv`` and the plots
``seq_rep_vs_ppl.png`` and (with ``--train-dirs``) ``validation_ppl.png``.

Installed, the same command is ``scalegrad-report``; the logic lives in
``scalegrad.cli``.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalegrad.cli import report_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
