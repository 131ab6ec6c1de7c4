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

from ..data import make_prefixes
from ..generation import generate_continuations, is_greedy
from ..io import write_json
from ..metrics import (CompletionMetrics, aggregate_ranking_metrics, ranking_metrics,
                       ranking_metrics_from_ranks, token_statistics)
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
    """``completion__{model}__spl_{split}__topk_{k}__topp_{p}__pfl_{pfl}__cnl_{cnl}.json``."""
    return (f"completion__{result_model_name(args.model_name)}__spl_{args.eval_split}"
            f"__topk_{args.top_k}__topp_{float(args.top_p)}__pfl_{args.prefix_length}"
            f"__cnl_{args.continuation_length}.json")


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
    write_json(path, {
        "bpe_metrics": report["bpe_metrics"],
        "word_metrics": report["word_metrics"],
        "uniq": report["uniq"],
        "config": config,
        "completions": report["completions"],
    })
    logger.info("completion metrics written to %s", path)
    return path


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
                         batch_size: int, seed: int) -> list[list[int]]:
    """Prefix + continuation ids of every prefix, in order (gathered across ranks)."""
    model = unwrap(model)
    mine = prefixes[runtime.rank::runtime.world_size]
    generator = None
    if not is_greedy(top_k, top_p):
        device = runtime.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed + runtime.rank)
    with runtime.autocast():
        completions = generate_continuations(
            model, mine, continuation_length, top_k=top_k, top_p=top_p, batch_size=batch_size,
            generator=generator, progress=runtime.show_progress).cpu().tolist()
    if not runtime.distributed:
        return completions
    gathered = runtime.gather_objects(completions)
    ordered: list[list[int]] = [None] * prefixes.size(0)  # type: ignore[list-item]
    for rank, rows in enumerate(gathered):
        ordered[rank::runtime.world_size] = rows
    return ordered


def eval_completion(model, tokenizer, chunks: torch.Tensor, runtime: Runtime, args) -> dict | None:
    """``docs/reference.md``, section 3: continue every prefix and measure the continuations.

    Returns the report (``bpe_metrics``, ``word_metrics``, ``uniq``,
    ``completions``) on rank 0, ``None`` on the other ranks.
    """
    prefixes = completion_prefixes(chunks, args.prefix_length)
    per_chunk = prefixes.size(0) // max(chunks.size(0), 1)
    batch_size = args.completion_batch_size or per_chunk
    if runtime.is_main:
        logger.info("continuing %d prefixes of %d tokens by %d tokens (%s), %d at a time",
                    prefixes.size(0), args.prefix_length, args.continuation_length,
                    "greedy" if is_greedy(args.top_k, args.top_p)
                    else f"top-k {args.top_k}, top-p {args.top_p}", batch_size)
    completions = generate_completions(
        model, prefixes, runtime, continuation_length=args.continuation_length,
        top_k=args.top_k, top_p=args.top_p, batch_size=batch_size, seed=args.seed)
    if not runtime.is_main:
        return None
    metrics = CompletionMetrics(tokenizer, args.prefix_length)
    metrics.update(completions)
    return metrics.report(args.eval_split)


def model_config_dict(model) -> dict:
    return unwrap(model).config.to_dict()
