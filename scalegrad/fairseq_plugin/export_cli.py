"""``scalegrad-export-hf`` (``scripts/export_fairseq_to_hf.py``): a fairseq checkpoint
of a ``gpt2_pretrained`` model -> a Hugging Face folder.

    scalegrad-export-hf --checkpoint checkpoints/sg/checkpoint_best.pt --output-dir exported/sg
    scalegrad-run-gpt2 --mode eval-both --model-load-dir exported/sg ...

The folder (``save_pretrained``: config, safetensors weights, tokenizer) loads with
``AutoModelForCausalLM.from_pretrained`` and gives the fairseq model's logits. No
fairseq is needed. The export itself is :func:`.checkpoints.export_to_hf`.
"""

from __future__ import annotations

import argparse
import logging

from ..cli import configure_logging
from ..errors import reports_user_errors
from .checkpoints import export_to_hf


@reports_user_errors
def main(argv=None) -> int:
    """``scalegrad-export-hf``: 0, or 2 with one ``error:`` line."""
    configure_logging(logging.WARNING)
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
    path = export_to_hf(args.checkpoint, args.output_dir, tokenizer=args.tokenizer,
                        save_tokenizer=not args.no_tokenizer)
    print(f"written: {path}")
    return 0

