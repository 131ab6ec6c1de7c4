"""``scalegrad-score``: score anyone's generations with the 2022 papers' metrics
(:mod:`scalegrad.scoring`, ``docs/metrics-2022.md``). Nothing in the package imports
this module; the console script and ``scripts/score_generations.py`` call it.
"""

from __future__ import annotations

import argparse
import logging

from .cli import configure_logging
from .errors import reports_user_errors
from .scoring import render_scores, score_files
from .text_metrics import add_text_metric_arguments, text_metric_options

SCORE_DOC = """Generations -> rep-2/3/4, diversity, gen-length, seq-rep-N, uniq-seq and, with
their models, MAUVE and coherence, as JSON (--output) and a short table.

    scalegrad-score --generations gens.txt --output scores.json
    scalegrad-score --generations seed1.txt seed2.txt seed3.txt --prefixes prefixes.txt \\
        --references human.txt --featurizer gpt2-large --coherence-model facebook/opt-2.7b \\
        --output scores.json

Input files (aligned line by line: line i of each is prefix i):
  *.txt (any name but .jsonl/.json)  plain text, one text a line
  *.jsonl  one JSON value a line: a string, or an object with the text under
           "continuation" (or "generation", "text"), "prefix" (prefix files), "reference"
           (reference files); a generations line may also carry its "prefix" and
           "reference", and several samples as a list under "continuations"
  *.json   (--generations only) a driver's completion__*.json result file with
           "continuations", "prefixes" and "references" (one with only "completions",
           as written before, is split with --tokenizer: see docs/metrics-2022.md)
Each --generations file (or each entry of a "continuations" list) is one sample set:
with several, every metric is the mean +- std over them. MAUVE needs --references and
the eval extra (pip install "scalegrad[eval]"); coherence needs --prefixes. Models are
hub names or local folders, taken from the local cache first.
(``python scripts/score_generations.py`` is the same command.)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=SCORE_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", nargs="+", required=True, metavar="FILE",
                        help="the continuations: one file per sample set (.txt, .jsonl, or a "
                             "driver's completion .json)")
    parser.add_argument("--prefixes", metavar="FILE", help="the prefixes (.txt or .jsonl)")
    parser.add_argument("--references", metavar="FILE",
                        help="the human continuations (.txt or .jsonl)")
    parser.add_argument("--output", metavar="OUT.json", help="write the scores here (JSON)")
    parser.add_argument("--tokenizer", metavar="TOKENIZER",
                        help="the run's tokenizer (name or folder), to split the completions of "
                             "result files that have no continuations")
    parser.add_argument("--format", choices=["text", "markdown"], default="text",
                        help="the table on standard output (default: text)")
    parser.add_argument("--device", default="cpu", help="device of the models (default: cpu)")
    add_text_metric_arguments(parser, scorer_aliases=True)
    return parser.parse_args(argv)


@reports_user_errors
def main(argv=None) -> int:
    """``scalegrad-score``: 0, or 2 with one ``error:`` line (nothing written)."""
    configure_logging(logging.WARNING)
    args = parse_args(argv)
    options = text_metric_options(args, device=args.device)
    result = score_files(args.generations, args.output, prefixes=args.prefixes,
                         references=args.references, options=options,
                         tokenizer=args.tokenizer)
    print(render_scores(result, args.format), end="")
    if args.output:
        print(f"written: {args.output}")
    return 0
