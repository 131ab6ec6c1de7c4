#!/usr/bin/env python
"""Export a fairseq checkpoint of a ``gpt2_pretrained`` model to a Hugging Face folder.

    python scripts/export_fairseq_to_hf.py --checkpoint checkpoints/sg/checkpoint_best.pt \\
        --output-dir exported/sg
    python scripts/run_gpt2.py --mode eval-both --model-load-dir exported/sg ...

The folder (``save_pretrained``: config, safetensors weights, tokenizer) loads with
``AutoModelForCausalLM.from_pretrained`` and gives the fairseq model's logits. No
fairseq is needed. Installed, the same command is ``scalegrad-export-hf``; the logic
lives in ``scalegrad.fairseq_plugin.export_cli``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad.fairseq_plugin.export_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
