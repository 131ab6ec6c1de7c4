"""Single-token and completion evaluation (``docs/reference.md``, sections 2, 3 and 5),
on the original's chunks and prefixes, with the original's result files.

Both run in a single process or split across torchrun processes (each takes every
``world_size``-th chunk or prefix; the results are gathered, so the numbers do not
depend on the number of processes). Only rank 0 writes the result file, once,
atomically.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import human_continuations, make_prefixes
from ..generation import generate_continuations, is_greedy
from ..io import write_json
from ..metrics import (CompletionMetrics, aggregate_ranking_metrics, continuation_text,
                       decode_text, ranking_metrics, ranking_metrics_from_ranks,
                       token_statistics)
from .options import result_model_name
from ..hf import unwrap
from .runtime import Runtime

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- #
# Result files
# --------------------------------------------------------------------------- #

def singletoken_filename(args, step: int | None = None) -> str:
    """``singletoken__{model}__spl_{split}__bsz_{bsz}{_step}.json``, as the original."""
    suffix = f"_{step}" if step is not None else ""
    return (f"singletoken__{result_model_name(args.model_name)}__spl_{args.eval_split}"
            f"__bsz_{args.batch_size_singletoken}{suffix}.json")


def completion_filename(args) -> str:
    """``completion__{model}__spl_{split}__topk_{k}__topp_{p}__pfl_{pfl}__cnl_{cnl}.json``
    (the original's name), then ``__alpha_{A}`` for contrastive search
    (``--penalty-alpha``) and ``__samples_{N}`` for ``--num-samples N > 1``."""
    name = (f"completion__{result_model_name(args.model_name)}__spl_{args.eval_split}"
            f"__topk_{args.top_k}__topp_{float(args.top_p)}__pfl_{args.prefix_length}"
            f"__cnl_{args.continuation_length}")
    if getattr(args, "penalty_alpha", None) is not None:
        name += f"__alpha_{float(args.penalty_alpha)}"
    if num_samples(args) > 1:
        name += f"__samples_{num_samples(args)}"
    return name + ".json"


def num_samples(args) -> int:
    """``--num-samples`` as used: 1 when not given."""
    return getattr(args, "num_samples", None) or 1


def sample_seeds(args) -> list[int]:
    """The seed of each sample: ``--seed``, ``--seed + 1``, ... (so sample ``i`` is
    the continuation a one-sample run with ``--seed SEED+i`` gives)."""
    return [args.seed + i for i in range(num_samples(args))]


def decoding_record(top_k: int, top_p: float, penalty_alpha: float | None,
                    seeds: list[int]) -> dict:
    """The ``decoding`` entry of a completion result file: greedy, contrastive search
    (``penalty_alpha``, ``top_k``) or sampling (``top_k``, ``top_p``, ``seed``, and
    ``seeds`` when there are several samples)."""
    if penalty_alpha is not None:
        return {"contrastive_search": True, "penalty_alpha": penalty_alpha, "top_k": top_k}
    if is_greedy(top_k, top_p):
        return {"greedy": True}
    record = {"top_k": top_k, "top_p": top_p, "seed": seeds[0]}
    if len(seeds) > 1:
        record["seeds"] = list(seeds)
    return record


def write_singletoken_result(directory, args, metrics: dict, config: dict,
                             step: int | None = None, objective: dict | None = None) -> Path:
    """The original's ``{"metrics", "config"}``; validations while training add
    ``"objective"``: the training objective and its parameters (``docs/objectives.md``)."""
    path = Path(directory) / singletoken_filename(args, step)
    content = {"metrics": metrics, "config": config}
    if objective is not None:
        content["objective"] = objective
    write_json(path, content)
    logger.info("single-token metrics written to %s", path)
    return path


def write_completion_result(directory, args, report: dict, config: dict) -> Path:
    path = Path(directory) / completion_filename(args)
    write_json(path, result_file_content(report, config))
    logger.info("completion metrics written to %s", path)
    return path


def result_file_content(report: dict, config: dict, **extra) -> dict:
    """A completion result file: the original's keys first (``bpe_metrics``,
    ``word_metrics``, ``uniq``, ``config``, ``completions``; those of the first
    sample), then ``extra`` and the new ones :func:`completion_report` made
    (``text_metrics``, ``decoding``, ``samples``, ``sample_statistics``)."""
    content = {key: report[key] for key in ("bpe_metrics", "word_metrics", "uniq")}
    content["config"] = config
    content["completions"] = report["completions"]
    content.update(extra)
    content.update({key: report[key] for key in NEW_REPORT_KEYS if key in report})
    return content


NEW_REPORT_KEYS = ("text_metrics", "decoding", "prefixes", "continuations", "references",
                   "samples", "sample_statistics")


# --------------------------------------------------------------------------- #
# Single-token evaluation
# --------------------------------------------------------------------------- #

def chunk_logging_output(logits: torch.Tensor, target: torch.Tensor, loss_sum: float) -> dict:
    """One chunk's summed metrics, as the original's per-chunk ``logging_output``."""
    return _with_counts(ranking_metrics(logits, target, ntokens=target.numel()), target, loss_sum)


def statistics_logging_output(stats: dict, target: torch.Tensor) -> dict:
    """:func:`chunk_logging_output` from :func:`scalegrad.metrics.token_statistics`."""
    output = ranking_metrics_from_ranks(stats["higher"], stats["predictions"], target,
                                        ntokens=target.numel())
    return _with_counts(output, target, stats["nll"].sum().item())


def _with_counts(output: dict, target: torch.Tensor, loss_sum: float) -> dict:
    ntokens = target.numel()
    output["loss"] = loss_sum
    output["normalizer"] = ntokens
    output["sample_size"] = ntokens
    output["ntokens"] = ntokens
    return output


@torch.no_grad()
def eval_singletoken(model, chunks: torch.Tensor, runtime: Runtime, *, desc: str = "Evaluating") -> dict:
    """``docs/reference.md``, section 2, over ``chunks`` (``(num_chunks, n + 1)``), one
    chunk per forward pass.

    Returns the original's aggregated metrics: ``loss`` (bits), ``ppl``, the
    ranking metrics, ``uniq`` and ``human_uniq`` (and the counts). Every rank
    gets the same dictionary.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = runtime.device
    mine = range(runtime.rank, chunks.size(0), runtime.world_size)
    logging_outputs = []
    predicted_seen = target_seen = None
    bar = None
    if runtime.show_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(mine), desc=desc, unit="chunk")
    try:
        for index in mine:
            chunk = chunks[index].to(device)
            inp, target = chunk[:-1].unsqueeze(0), chunk[1:]
            with runtime.autocast():
                logits = model(input_ids=inp).logits[0]
            stats = token_statistics(logits.float(), target)
            logging_outputs.append(statistics_logging_output(stats, target))
            if predicted_seen is None:
                vocab = logits.size(-1)
                predicted_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                target_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            predicted_seen[stats["predictions"]] = True
            target_seen[target] = True
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)

    if runtime.distributed:
        gathered = runtime.gather_objects((logging_outputs, _indices(predicted_seen),
                                           _indices(target_seen)))
        logging_outputs = [log for logs, _, _ in gathered for log in logs]
        predicted = set().union(*(p for _, p, _ in gathered))
        targets = set().union(*(t for _, _, t in gathered))
        num_predicted, num_targets = len(predicted), len(targets)
    else:
        num_predicted = int(predicted_seen.sum()) if predicted_seen is not None else 0
        num_targets = int(target_seen.sum()) if target_seen is not None else 0

    metrics = aggregate_ranking_metrics(logging_outputs)
    metrics["ppl"] = 2 ** metrics["loss"]
    metrics["uniq"] = num_predicted
    metrics["human_uniq"] = num_targets
    return metrics


def _indices(seen: torch.Tensor | None) -> list[int]:
    return [] if seen is None else seen.nonzero().view(-1).tolist()


# --------------------------------------------------------------------------- #
# Completion evaluation
# --------------------------------------------------------------------------- #

def completion_prefixes(chunks: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """The original's prefixes: every chunk cut into windows of ``prefix_length``."""
    return make_prefixes(chunks, prefix_length)


def generate_completions(model, prefixes: torch.Tensor, runtime: Runtime, *,
                         continuation_length: int, top_k: int, top_p: float,
                         batch_size: int, seed: int,
                         penalty_alpha: float | None = None) -> list[list[int]]:
    """Prefix + continuation ids of every prefix, in order (gathered across ranks);
    contrastive search with ``penalty_alpha``."""
    model = unwrap(model)
    mine = prefixes[runtime.rank::runtime.world_size]
    generator = None
    if penalty_alpha is None and not is_greedy(top_k, top_p):
        device = runtime.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed + runtime.rank)
    with runtime.autocast():
        completions = generate_continuations(
            model, mine, continuation_length, top_k=top_k, top_p=top_p, batch_size=batch_size,
            generator=generator, penalty_alpha=penalty_alpha,
            progress=runtime.show_progress).cpu().tolist()
    if not runtime.distributed:
        return completions
    gathered = runtime.gather_objects(completions)
    ordered: list[list[int]] = [None] * prefixes.size(0)  # type: ignore[list-item]
    for rank, rows in enumerate(gathered):
        ordered[rank::runtime.world_size] = rows
    return ordered


def completion_report(tokenizer, samples: list[list[list[int]]], prefix_length: int, split: str,
                      *, seeds: list[int], decoding: dict,
                      references: list[list[int]] | None = None, options=None) -> dict:
    """The completion results of one or more samples (``samples[s]``: prefix +
    continuation ids of every prefix, sample ``s``, drawn with ``seeds[s]``).

    The original's ``bpe_metrics``, ``word_metrics``, ``uniq`` and ``completions``
    (:class:`scalegrad.metrics.CompletionMetrics`) of the first sample, as before;
    ``text_metrics``: the 2022 papers' columns (rep-2/3/4, diversity, gen-length,
    word seq-rep-N, uniq-seq) of the decoded continuations, their mean and std over
    the samples, and the human row of ``references`` (the true continuations' ids),
    by :func:`scalegrad.text_metrics.score_samples` (``docs/metrics-2022.md``) with
    ``options`` (a ``TextMetricOptions``; ``None``: the defaults, no model-based
    metric); ``decoding``; the texts ``prefixes``, ``continuations`` (one list per
    sample with several) and ``references``. With several samples also ``samples`` (each sample's seed and
    original metrics and completions) and ``sample_statistics`` (``mean`` and
    ``std`` over the samples of every original metric).
    """
    from ..text_metrics import score_samples, summarize_samples

    per_sample = []
    for ids in samples:
        metrics = CompletionMetrics(tokenizer, prefix_length)
        metrics.update(ids)
        per_sample.append(metrics.report(split))
    report = dict(per_sample[0])
    prefix_texts = [decode_text(tokenizer, row[:prefix_length]) for row in samples[0]]
    continuations = [[continuation_text(tokenizer, row, prefix_length) for row in ids]
                     for ids in samples]
    reference_texts = None
    if references is not None:
        reference_texts = [decode_text(tokenizer, ids) for ids in references]
    report["text_metrics"] = score_samples(prefix_texts, continuations, reference_texts, options)
    report["text_metrics"]["seeds"] = list(seeds)
    report["decoding"] = decoding
    # the texts, for scalegrad-score (docs/metrics-2022.md, "Result layout")
    report["prefixes"] = prefix_texts
    report["continuations"] = continuations[0] if len(samples) == 1 else continuations
    if reference_texts is not None:
        report["references"] = reference_texts
    if len(samples) > 1:
        report["samples"] = [{"seed": seed, **sample} for seed, sample in zip(seeds, per_sample)]
        flat = [{**sample["bpe_metrics"], **sample["word_metrics"], "uniq": sample["uniq"]}
                for sample in per_sample]
        mean, std = summarize_samples(flat)
        report["sample_statistics"] = {"mean": mean, "std": std}
    return report


def eval_completion(model, tokenizer, chunks: torch.Tensor, runtime: Runtime, args) -> dict | None:
    """``docs/reference.md``, section 3: continue every prefix and measure the continuations
    (``--num-samples`` times with sampling, see :func:`completion_report`).

    Returns the report (``bpe_metrics``, ``word_metrics``, ``uniq``,
    ``completions`` and the new keys) on rank 0, ``None`` on the other ranks.
    """
    prefixes = completion_prefixes(chunks, args.prefix_length)
    per_chunk = prefixes.size(0) // max(chunks.size(0), 1)
    batch_size = args.completion_batch_size or per_chunk
    penalty_alpha = getattr(args, "penalty_alpha", None)
    seeds = sample_seeds(args)
    if runtime.is_main:
        if penalty_alpha is not None:
            how = f"contrastive search, alpha {penalty_alpha}, top-k {args.top_k}"
        elif is_greedy(args.top_k, args.top_p):
            how = "greedy"
        else:
            how = f"top-k {args.top_k}, top-p {args.top_p}, {len(seeds)} sample(s)"
        logger.info("continuing %d prefixes of %d tokens by %d tokens (%s), %d at a time",
                    prefixes.size(0), args.prefix_length, args.continuation_length, how,
                    batch_size)
    samples = [generate_completions(
        model, prefixes, runtime, continuation_length=args.continuation_length,
        top_k=args.top_k, top_p=args.top_p, batch_size=batch_size, seed=seed,
        penalty_alpha=penalty_alpha) for seed in seeds]
    if not runtime.is_main:
        return None
    references = human_continuations(chunks, args.prefix_length, args.continuation_length)
    return completion_report(tokenizer, samples, args.prefix_length, args.eval_split, seeds=seeds,
                             decoding=decoding_record(args.top_k, args.top_p, penalty_alpha, seeds),
                             references=references)


def model_config_dict(model) -> dict:
    return unwrap(model).config.to_dict()
