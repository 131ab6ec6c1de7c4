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
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalegrad import data, tokenization  # noqa: E402
from scalegrad.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="text files or folders (searched recursively for *.txt); "
                             "default: the offline pydoc corpus bundled with Python")
    parser.add_argument("--output-dir", required=True,
                        help="where the three {split}_tokens_bpe_gpt2.pt files go")
    parser.add_argument("--tokenizer", default="gpt2",
                        help="tokenizer name or folder (default: gpt2)")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="train a byte-level BPE on the training split instead of loading one")
    parser.add_argument("--vocab-size", type=int, default=8000,
                        help="vocabulary size of a trained BPE (default: 8000)")
    parser.add_argument("--valid-fraction", type=float, default=0.05,
                        help="share of the text for the valid split (default: 0.05)")
    parser.add_argument("--test-fraction", type=float, default=0.05,
                        help="share of the text for the test split (default: 0.05)")
    parser.add_argument("--fairseq-data-bin", metavar="DIR",
                        help="also binarise the ids with fairseq-preprocess into DIR")
    parser.add_argument("--fairseq-ids-per-line", type=int, default=512,
                        help="ids per line of the text handed to fairseq (it appends </s> "
                             "to each line; default: 512)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.fairseq_data_bin and not data.fairseq_available():
        raise UserError("--fairseq-data-bin needs fairseq, which is not installed here; "
                        "install it or drop the option")
    if args.fairseq_ids_per_line < 1:
        raise UserError(f"--fairseq-ids-per-line must be at least 1, got {args.fairseq_ids_per_line}")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output-dir {output_dir} exists and is not a folder")

    text = data.read_text_inputs(args.input) if args.input else data.default_corpus_text()
    texts = data.split_corpus(text, args.valid_fraction, args.test_fraction)

    tokenizer_dir = output_dir / "tokenizer"
    tokenizer = None
    if not args.train_tokenizer:
        try:
            tokenizer = tokenization.load_tokenizer(args.tokenizer)
        except UserError as exc:
            if os.path.exists(args.tokenizer):
                raise
            print(f"warning: {exc}", file=sys.stderr)
            print(f"warning: training a byte-level BPE on the training split instead "
                  f"(saved under {tokenizer_dir})", file=sys.stderr)
    if tokenizer is None:
        tokenizer = tokenization.train_bpe_tokenizer(texts["train"], args.vocab_size, tokenizer_dir)
        tokenizer_source = str(tokenizer_dir)
    else:
        tokenizer_source = args.tokenizer

    splits = tokenization.tokenize_splits(tokenizer, texts)
    vocab_size = len(tokenizer)
    paths = data.save_splits(splits, output_dir)
    if args.fairseq_data_bin:
        data.write_fairseq_data_bin(splits, args.fairseq_data_bin, vocab_size=vocab_size,
                                    ids_per_line=args.fairseq_ids_per_line)

    for split in data.SPLITS:
        print(f"{split}: {splits[split].numel()} tokens -> {paths[split]}")
    print(f"vocabulary size: {vocab_size} (tokenizer: {tokenizer_source})")
    if args.fairseq_data_bin:
        print(f"fairseq data-bin: {args.fairseq_data_bin} "
              f"(fairseq index = token id + {data.FAIRSEQ_NUM_SPECIAL})")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        force=True)
    sys.exit(main())
