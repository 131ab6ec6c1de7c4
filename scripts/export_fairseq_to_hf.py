#!/usr/bin/env python
"""Export a fairseq checkpoint of a ``gpt2_pretrained`` model to a Hugging Face folder.

    python scripts/export_fairseq_to_hf.py --checkpoint checkpoints/sg/checkpoint_best.pt \\
        --output-dir exported/sg
    python scripts/run_gpt2.py --mode eval-both --model-load-dir exported/sg ...

The folder (``save_pretrained``: config, safetensors weights, tokenizer) loads with
``AutoModelForCausalLM.from_pretrained`` and gives the fairseq model's logits. No
fairseq is needed. The logic lives in ``scalegrad.fairseq_plugin.checkpoints``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad.errors import UserError  # noqa: E402
from scalegrad.fairseq_plugin.checkpoints import export_to_hf  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", "--path", dest="checkpoint", required=True,
                        help="fairseq checkpoint file (checkpoint_best.pt, ...)")
    parser.add_argument("--output-dir", required=True,
                        help="folder to write (replaced if it exists)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to save with the model (hub name or folder); default: "
                             "the one the checkpoint was trained with")
    parser.add_argument("--no-tokenizer", action="store_true", help="save the model only")
    args = parser.parse_args(argv)
    try:
        path = export_to_hf(args.checkpoint, args.output_dir, tokenizer=args.tokenizer,
                            save_tokenizer=not args.no_tokenizer)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
