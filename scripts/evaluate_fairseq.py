#!/usr/bin/env python
"""Evaluate fairseq language model checkpoints as the unlikelihood module's
``custom/evaluation.py`` did: completions, single-token predictions, targets and
metrics of one split, in files named with the original's suffix.

    python scripts/evaluate_fairseq.py --data-dir data-bin/wikitext-103 \\
        --model-path checkpoints/sg0.2 --ckpt best --save-path results/sg0.2 \\
        --data-split valid --completion-length 100
    python scripts/evaluate_fairseq.py ... --beam-size 4 --beam-ngram-block 4 --eval-mode completion
    python scripts/report_metrics.py --eval-dirs results/sg0.2 --model-names sg0.2

Any fairseq language model works (transformer_lm, transformer_lm_ul,
gpt2_pretrained, ...); ``--result-format gpt2`` writes a gpt2_pretrained
checkpoint's results named like run_gpt2.py's instead. See docs/fairseq.md.
Installed, the same command is ``scalegrad-evaluate-fairseq``; the logic lives in
``scalegrad.fairseq_plugin.eval_cli``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad.fairseq_plugin.eval_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
