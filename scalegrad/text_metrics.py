"""The metrics of the 2022 degeneration papers on generated text, one implementation
for the drivers, the scorer (``scalegrad-score``) and the report
(``docs/metrics-2022.md``, where each definition and its paper are given).

* :func:`rep_n_and_diversity`: SimCTG's rep-2/3/4 and diversity, exactly as
  ``simctg==0.7``'s ``evaluation.measure_repetition_and_diversity`` (its quirk of
  not counting each text's last n-gram kept; ``count_last_ngram=True`` corrects it);
* :func:`generation_length`: mean whitespace tokens per text;
* :func:`word_sequence_metrics`: the 2019 seq-rep-N and uniq-seq of the drivers, on
  the continuations' words (:mod:`scalegrad.metrics`);
* MAUVE and coherence (:mod:`scalegrad.model_metrics`) when their models are given.

:func:`score_texts` gives one sample set's columns, :func:`score_samples` several
sample sets (seeds) as mean and standard deviation (:func:`summarize_samples`) with
the human references' row: the dict a driver stores under ``text_metrics`` in its
completion result file and the scorer writes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from .errors import UserError

__all__ = [
    "REP_NS", "GENERATION_COLUMNS", "HUMAN_COLUMNS", "TextMetricOptions", "ngram_counts",
    "rep_n_and_diversity", "generation_length", "word_sequence_metrics", "score_texts",
    "reference_scores", "summarize_samples", "score_samples", "add_text_metric_arguments",
    "text_metric_options",
]

REP_NS = (2, 3, 4)

#: The columns of :func:`score_texts`, in the order the scorer and the report print them.
GENERATION_COLUMNS = ["rep-2", "rep-3", "rep-4", "diversity", "gen-length", "mauve", "coherence",
                      "simcse-coherence", "seq-rep-1", "seq-rep-4", "uniq-seq"]
#: The columns a human reference row can have (MAUVE compares generations with them).
HUMAN_COLUMNS = [c for c in GENERATION_COLUMNS if c != "mauve"]


@dataclass
class TextMetricOptions:
    """What :func:`score_texts` computes and how (``docs/metrics-2022.md``).

    rep-n: ``count_last_ngram`` (False: simctg's count, which misses each text's last
    n-gram), ``round_digits`` (simctg rounds the rep-n percentages to 2 decimals before
    the diversity product; None: no rounding).
    MAUVE (needs references and the ``eval`` extra): ``featurizer`` (a causal LM's hub
    name or folder; None: no MAUVE; the papers use ``gpt2-large``), ``max_text_length``
    (featurizer tokens kept at most, after each reference/generation pair is cut to
    the shorter one), ``mauve_scaling_factor``, ``seed`` (k-means), ``num_buckets``.
    coherence: ``coherence_model`` (the evaluator causal LM; Su and Collier use OPT
    models, e.g. ``facebook/opt-2.7b``), ``simcse_model`` (an encoder; the contrastive
    decoding papers use ``princeton-nlp/sup-simcse-bert-base-uncased``),
    ``simcse_pooler`` (``auto``, ``cls``, ``cls_before_pooler``).
    ``batch_size`` and ``device`` for every model.
    """

    count_last_ngram: bool = False
    round_digits: int | None = 2
    featurizer: str | None = None
    max_text_length: int = 200
    mauve_scaling_factor: float = 5.0
    seed: int = 25
    num_buckets: int | str = "auto"
    coherence_model: str | None = None
    simcse_model: str | None = None
    simcse_pooler: str = "auto"
    batch_size: int = 8
    device: str = "cpu"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- #
# SimCTG's rep-n and diversity, generation length
# --------------------------------------------------------------------------- #

def ngram_counts(text: str, n: int, *, count_last_ngram: bool = False) -> tuple[int, int]:
    """``(distinct, total)`` n-grams of the whitespace tokens of ``text``.

    As simctg's ``eval_text``: the window stops one short of the end, so a text of
    ``L`` tokens gives ``L - n`` n-grams (``max(0, .)``), its last n-gram never
    counted; ``count_last_ngram=True`` counts all ``L - n + 1``.
    """
    tokens = text.strip().split()
    stop = len(tokens) - n + (1 if count_last_ngram else 0)
    grams = [tuple(tokens[i:i + n]) for i in range(max(0, stop))]
    return len(set(grams)), len(grams)


def rep_n_and_diversity(texts: Sequence[str], *, count_last_ngram: bool = False,
                        round_digits: int | None = 2) -> dict:
    """``{"rep-2", "rep-3", "rep-4", "diversity"}`` of ``texts`` (SimCTG, Su et al. 2022).

    rep-n = ``100 * (1 - sum distinct / sum total)`` n-grams, micro-averaged over the
    texts (the distinct n-grams counted per text), rounded to ``round_digits``;
    diversity = ``prod over n of (1 - rep-n / 100)`` of the rounded values, a
    fraction, as ``simctg.evaluation.measure_repetition_and_diversity`` returns it.
    Where no text has an n-gram (simctg divides by zero) rep-n is 0.0.
    """
    out = {}
    diversity = 1.0
    for n in REP_NS:
        distinct = total = 0
        for text in texts:
            d, t = ngram_counts(text.strip("\n"), n, count_last_ngram=count_last_ngram)
            distinct += d
            total += t
        rep = (1 - distinct / total) * 100 if total else 0.0
        if round_digits is not None:
            rep = round(rep, round_digits)
        out[f"rep-{n}"] = rep
        diversity *= 1 - rep / 100
    out["diversity"] = diversity
    return out


def generation_length(texts: Sequence[str]) -> float:
    """Mean number of whitespace tokens per text (Su and Collier's gen-length)."""
    if not texts:
        return 0.0
    return sum(len(text.strip().split()) for text in texts) / len(texts)


def word_sequence_metrics(continuations: Sequence[str]) -> dict:
    """The drivers' word-level ``seq-rep-1`` .. ``seq-rep-4`` (``docs/reference.md``,
    section 3: the mean of ``pct_repeat_{N}grams`` over the continuations of more than
    3 words, rounded to 4 digits as the result files) and ``uniq-seq`` (distinct
    space-separated pieces of the continuations), from the continuation texts."""
    from .metrics import NgramMetrics, split_words

    ngrams = NgramMetrics(pad=-1)
    ngrams.update([words for words in map(split_words, continuations) if len(words) > 3])
    report = ngrams.report("word")
    out = {f"seq-rep-{n}": report.get(f"word/pct_repeat_{n}grams", 0.0) for n in range(1, 5)}
    out["uniq-seq"] = len({piece for text in continuations for piece in text.split(" ")})
    return out


# --------------------------------------------------------------------------- #
# One sample set, several sample sets
# --------------------------------------------------------------------------- #

def _check_counts(prefixes, continuations, references) -> None:
    if prefixes is not None and len(prefixes) != len(continuations):
        raise UserError(f"{len(prefixes)} prefixes but {len(continuations)} continuations: "
                        f"give one continuation per prefix")
    if references is not None and len(references) != len(continuations):
        raise UserError(f"{len(references)} references but {len(continuations)} continuations: "
                        f"give one reference per prefix")


def score_texts(prefixes: Sequence[str] | None, continuations: Sequence[str],
                references: Sequence[str] | None = None,
                options: TextMetricOptions | None = None, *, models: dict | None = None) -> dict:
    """The papers' columns of one continuation per prefix (``docs/metrics-2022.md``).

    ``prefixes`` (may be None: no coherence), ``continuations`` and ``references``
    (the human continuations, may be None: no MAUVE) are texts, aligned by index.
    Returns ``rep-2``, ``rep-3``, ``rep-4``, ``diversity``, ``gen-length``,
    ``seq-rep-1`` .. ``seq-rep-4``, ``uniq-seq``, and ``mauve`` when
    ``options.featurizer`` is set, ``coherence`` / ``simcse-coherence`` when
    ``options.coherence_model`` / ``options.simcse_model`` are. ``models`` caches
    the loaded models between calls (a dict the caller keeps). Bad input raises
    :class:`UserError`.
    """
    options = options or TextMetricOptions()
    _check_counts(prefixes, continuations, references)
    out = rep_n_and_diversity(continuations, count_last_ngram=options.count_last_ngram,
                              round_digits=options.round_digits)
    out["gen-length"] = generation_length(continuations)
    out.update(word_sequence_metrics(continuations))
    out.update(_model_scores(prefixes, continuations, references, options, models,
                             mauve=True))
    return out


def reference_scores(prefixes: Sequence[str] | None, references: Sequence[str],
                     options: TextMetricOptions | None = None, *,
                     models: dict | None = None) -> dict:
    """The human row: :func:`score_texts`' columns of the references themselves
    (no MAUVE: it compares generations with these)."""
    options = options or TextMetricOptions()
    _check_counts(prefixes, references, None)
    out = rep_n_and_diversity(references, count_last_ngram=options.count_last_ngram,
                              round_digits=options.round_digits)
    out["gen-length"] = generation_length(references)
    out.update(word_sequence_metrics(references))
    out.update(_model_scores(prefixes, references, None, options, models, mauve=False))
    return out


def _model_scores(prefixes, continuations, references, options, models, *, mauve) -> dict:
    if not (options.featurizer and mauve) and not options.coherence_model \
            and not options.simcse_model:
        return {}
    from . import model_metrics

    models = {} if models is None else models
    out = {}
    if options.featurizer and mauve:
        if references is None:
            raise UserError("MAUVE compares generations with human references: give the "
                            "references too (or no featurizer)")
        out["mauve"] = model_metrics.mauve_score(
            references, continuations, options.featurizer,
            max_text_length=options.max_text_length,
            mauve_scaling_factor=options.mauve_scaling_factor, seed=options.seed,
            num_buckets=options.num_buckets, batch_size=options.batch_size,
            device=options.device, models=models)
    for name, source in (("coherence", options.coherence_model),
                         ("simcse-coherence", options.simcse_model)):
        if not source:
            continue
        if prefixes is None:
            raise UserError(f"{name} scores a continuation given its prefix: give the prefixes "
                            f"too")
        if name == "coherence":
            out[name] = model_metrics.logprob_coherence(
                prefixes, continuations, source, batch_size=options.batch_size,
                device=options.device, models=models)
        else:
            out[name] = model_metrics.simcse_coherence(
                prefixes, continuations, source, pooler=options.simcse_pooler,
                batch_size=options.batch_size, device=options.device, models=models)
    return out


def summarize_samples(per_sample: Sequence[dict]) -> tuple[dict, dict]:
    """``(mean, std)`` per metric over several sample sets (one dict of columns each,
    e.g. one per seed): ``numpy.mean`` and ``numpy.std`` (population, ``ddof=0``, as
    Su and Collier's evaluation scripts). A metric missing from some sample set, or
    ``None`` in one, is left out."""
    if not per_sample:
        return {}, {}
    mean, std = {}, {}
    for key in per_sample[0]:
        values = [sample.get(key) for sample in per_sample]
        if any(v is None or isinstance(v, bool) or not isinstance(v, (int, float))
               for v in values):
            continue
        m = sum(values) / len(values)
        mean[key] = m
        std[key] = math.sqrt(sum((v - m) ** 2 for v in values) / len(values))
    return mean, std


def score_samples(prefixes: Sequence[str] | None, samples: Sequence[Sequence[str]],
                  references: Sequence[str] | None = None,
                  options: TextMetricOptions | None = None) -> dict:
    """Several continuations per prefix: ``samples[s][i]`` is sample ``s`` of prefix
    ``i`` (one list per seed; a single list of continuations is one sample set).

    Returns the result layout (``docs/metrics-2022.md``, "Result layout"):
    ``{"metrics": mean per column, "std": std per column (with 2 or more sample
    sets), "per_sample": [columns of each sample set], "human": the references'
    columns (with references), "num_samples", "num_prefixes", "options"}``.
    """
    options = options or TextMetricOptions()
    if not samples:
        raise UserError("no continuations to score")
    models: dict = {}
    per_sample = [score_texts(prefixes, list(continuations), references, options,
                              models=models) for continuations in samples]
    mean, std = summarize_samples(per_sample)
    result = {"metrics": mean if len(per_sample) > 1 else dict(per_sample[0]),
              "num_samples": len(per_sample), "num_prefixes": len(samples[0]),
              "per_sample": per_sample}
    if len(per_sample) > 1:
        result["std"] = std
    if references is not None:
        result["human"] = reference_scores(prefixes, references, options, models=models)
    result["options"] = options.to_dict()
    return result


# --------------------------------------------------------------------------- #
# The command-line flags, one home for the scorer and the drivers
# --------------------------------------------------------------------------- #

def add_text_metric_arguments(parser, *, scorer_aliases: bool = False):
    """The flags of :class:`TextMetricOptions` as an argument group of ``parser``
    (``--featurizer``, ``--max-text-length``, ``--mauve-scaling-factor``,
    ``--mauve-seed``, ``--coherence-model``, ``--simcse-model``, ``--simcse-pooler``,
    ``--count-last-ngram``, ``--rep-n-unrounded``, ``--metrics-batch-size``), for the
    scorer and the drivers alike; ``scorer_aliases`` adds ``--seed``, ``--batch-size``
    and ``--no-rounding`` (names the drivers use for other things). Read them back
    with :func:`text_metric_options`."""
    group = parser.add_argument_group("the 2022 papers' metrics (docs/metrics-2022.md)")
    group.add_argument("--featurizer", metavar="MODEL",
                       help="causal LM (hub name or folder) whose features MAUVE compares "
                            "(the papers: gpt2-large); needs references and the eval extra")
    group.add_argument("--max-text-length", type=int, default=200,
                       help="MAUVE: featurizer tokens kept at most per text (default: 200)")
    group.add_argument("--mauve-scaling-factor", type=float, default=5.0,
                       help="MAUVE's scaling constant c (default: 5)")
    seeds = ["--mauve-seed"] + (["--seed"] if scorer_aliases else [])
    group.add_argument(*seeds, dest="mauve_seed", type=int, default=25,
                       help="MAUVE's k-means seed (default: 25)")
    group.add_argument("--coherence-model", metavar="MODEL",
                       help="evaluator causal LM of the log-prob coherence (the papers: "
                            "facebook/opt-2.7b); needs prefixes")
    group.add_argument("--simcse-model", metavar="MODEL",
                       help="SimCSE encoder of the cosine coherence (the papers: "
                            "princeton-nlp/sup-simcse-bert-base-uncased); needs prefixes")
    group.add_argument("--simcse-pooler", choices=["auto", "cls", "cls_before_pooler"],
                       default="auto", help="SimCSE pooling (default: auto, as SimCSE's tool)")
    group.add_argument("--count-last-ngram", action="store_true",
                       help="rep-n counts each text's last n-gram too (simctg does not)")
    rounding = ["--rep-n-unrounded"] + (["--no-rounding"] if scorer_aliases else [])
    group.add_argument(*rounding, dest="rep_n_unrounded", action="store_true",
                       help="rep-n unrounded (simctg rounds to 2 decimals)")
    batch = ["--metrics-batch-size"] + (["--batch-size"] if scorer_aliases else [])
    group.add_argument(*batch, dest="metrics_batch_size", type=int, default=8,
                       help="texts per forward pass of the metrics' models (default: 8)")
    return group


def text_metric_options(args, *, device: str = "cpu") -> TextMetricOptions:
    """:class:`TextMetricOptions` from :func:`add_text_metric_arguments`' flags; a bad
    value, or ``--featurizer`` without the eval extra, is a :class:`UserError` (so a
    command fails before it generates or reads anything)."""
    for flag, value in (("--max-text-length", args.max_text_length),
                        ("--metrics-batch-size", args.metrics_batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if not args.mauve_scaling_factor > 0:
        raise UserError(f"--mauve-scaling-factor must be positive, got {args.mauve_scaling_factor}")
    if args.featurizer:
        from .model_metrics import require_mauve

        require_mauve()
    return TextMetricOptions(
        count_last_ngram=args.count_last_ngram, round_digits=None if args.rep_n_unrounded else 2,
        featurizer=args.featurizer, max_text_length=args.max_text_length,
        mauve_scaling_factor=args.mauve_scaling_factor, seed=args.mauve_seed,
        coherence_model=args.coherence_model, simcse_model=args.simcse_model,
        simcse_pooler=args.simcse_pooler, batch_size=args.metrics_batch_size, device=device)
