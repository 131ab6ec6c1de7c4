#!/usr/bin/env python
"""Raw text -> ``{train,valid,test}_tokens_bpe_gpt2.pt`` (the original data format).

Examples:

    # offline demo: the Python docs bundled with CPython, a BPE trained on them
    python scripts/prepare_data.py --output-dir data/pydoc --train-tokenizer

    # your own text with the real GPT-2 tokenizer (needs internet once)
    python scripts/prepare_data.py --input corpus/ --tokenizer gpt2 --output-dir data/mine

    # also a fairseq data-bin over the same ids
    python scripts/prepare_data.py --output-dir data/pydoc --fairseq-data-bin data-bin/pydoc

The text is split by position (train first, then valid, then test) at paragraph
boundaries. When ``--tokenizer`` is a hub name that cannot be loaded (no
internet), a byte-level BPE is trained on the training split instead and saved
under ``OUTPUT_DIR/tokenizer``; pass that folder as the tokenizer/model of later runs.

Installed, the same command is ``scalegrad-prepare-data``; the logic lives in
``scalegrad.cli``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalegrad.cli import prepare_data_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
