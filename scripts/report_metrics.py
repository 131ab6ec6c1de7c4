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
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from scalegrad.errors import UserError  # noqa: E402
from scalegrad.io import atomic_path  # noqa: E402
from scalegrad.report import (collect_original_rows, collect_rows, plot_seq_rep_vs_ppl,  # noqa: E402
                              plot_validation_curves, render)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        if not args.run_dirs and not args.eval_dirs:
            raise UserError("give RUN_DIRs (run_gpt2.py results) and/or --eval-dirs "
                            "(evaluate_fairseq.py results)")
        rows = []
        if args.run_dirs:
            rows += collect_rows(args.run_dirs, args.names, view=args.view, human=not args.no_human)
        if args.eval_dirs:
            rows += collect_original_rows(args.eval_dirs, args.model_names, human=not args.no_human)
        print(render(rows, args.format), end="")
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            for name, fmt in (("report.md", "markdown"), ("report.csv", "csv")):
                with atomic_path(os.path.join(args.output_dir, name)) as tmp:
                    tmp.write_text(render(rows, fmt))
            written = [os.path.join(args.output_dir, n) for n in ("report.md", "report.csv")]
            written.append(str(plot_seq_rep_vs_ppl(rows, os.path.join(args.output_dir, "seq_rep_vs_ppl.png"))))
            if args.train_dirs:
                names = args.train_names or [os.path.basename(os.path.normpath(d)) for d in args.train_dirs]
                if len(names) != len(args.train_dirs):
                    raise UserError("--train-names needs one name per --train-dirs entry")
                written.append(str(plot_validation_curves(
                    args.train_dirs, names, os.path.join(args.output_dir, "validation_ppl.png"))))
            print("written: " + ", ".join(written))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
