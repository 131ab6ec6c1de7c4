"""``scalegrad-score``: score anyone's generations with the 2022 papers' metrics
(:mod:`scalegrad.scoring`, ``docs/metrics-2022.md``). Nothing in the package imports
this module; the console script and ``scripts/score_generations.py`` call it.
"""

from __future__ import annotations

import argparse
import logging

from .cli import configure_logging
from .errors import UserError, reports_user_errors
from .scoring import render_scores, score_files
from .text_metrics import TextMetricOptions

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
           "continuations", "prefixes" and "references"
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
    parser.add_argument("--format", choices=["text", "markdown"], default="text",
                        help="the table on standard output (default: text)")
    parser.add_argument("--count-last-ngram", action="store_true",
                        help="rep-n counts each text's last n-gram too (simctg does not)")
    parser.add_argument("--no-rounding", action="store_true",
                        help="rep-n unrounded (simctg rounds to 2 decimals)")
    parser.add_argument("--featurizer", metavar="MODEL",
                        help="causal LM (name or folder) whose features MAUVE compares "
                             "(the papers: gpt2-large); needs --references")
    parser.add_argument("--max-text-length", type=int, default=200,
                        help="featurizer tokens kept at most per text (default: 200)")
    parser.add_argument("--mauve-scaling-factor", type=float, default=5.0,
                        help="MAUVE's scaling constant c (default: 5)")
    parser.add_argument("--seed", type=int, default=25, help="MAUVE's k-means seed (default: 25)")
    parser.add_argument("--coherence-model", metavar="MODEL",
                        help="evaluator causal LM of the log-prob coherence (the papers: "
                             "facebook/opt-2.7b); needs --prefixes")
    parser.add_argument("--simcse-model", metavar="MODEL",
                        help="SimCSE encoder of the cosine coherence (the papers: "
                             "princeton-nlp/sup-simcse-bert-base-uncased); needs --prefixes")
    parser.add_argument("--simcse-pooler", choices=["auto", "cls", "cls_before_pooler"],
                        default="auto", help="SimCSE pooling (default: auto, as SimCSE's tool)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="texts per forward pass of the models (default: 8)")
    parser.add_argument("--device", default="cpu", help="device of the models (default: cpu)")
    return parser.parse_args(argv)


def options_from_args(args) -> TextMetricOptions:
    for flag, value in (("--max-text-length", args.max_text_length),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.mauve_scaling_factor <= 0:
        raise UserError(f"--mauve-scaling-factor must be positive, got {args.mauve_scaling_factor}")
    if args.featurizer:
        from .model_metrics import require_mauve

        require_mauve()
    return TextMetricOptions(
        count_last_ngram=args.count_last_ngram, round_digits=None if args.no_rounding else 2,
        featurizer=args.featurizer, max_text_length=args.max_text_length,
        mauve_scaling_factor=args.mauve_scaling_factor, seed=args.seed,
        coherence_model=args.coherence_model, simcse_model=args.simcse_model,
        simcse_pooler=args.simcse_pooler, batch_size=args.batch_size, device=args.device)


@reports_user_errors
def main(argv=None) -> int:
    """``scalegrad-score``: 0, or 2 with one ``error:`` line (nothing written)."""
    configure_logging(logging.WARNING)
    args = parse_args(argv)
    options = options_from_args(args)
    result = score_files(args.generations, args.output, prefixes=args.prefixes,
                         references=args.references, options=options)
    print(render_scores(result, args.format), end="")
    if args.output:
        print(f"written: {args.output}")
    return 0
