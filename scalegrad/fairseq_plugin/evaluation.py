"""The two passes of the original fairseq evaluation script over one split
(``docs/reference.md``, fairseq evaluation), for any fairseq language model
loaded by :mod:`.loading`.

Single-token pass (:func:`single_token_pass`): blocks of
``--batch-size-single-prediction`` tokens (the task's dataset, teacher forcing);
the padding logit is set to ``-1e19`` before anything is computed from the
logits; per block the ranking metrics of section 2 (:mod:`scalegrad.metrics`,
median averaged over blocks), summed NLL for ``ppl``, and ``avg_wrong_mass``
(the softmax mass of the tokens scoring above the target, per token). With
``--singletoken-topk K > 1`` also ``true_topk_K_prob``, ``repeat_topk_K``,
``wrepeat_topk_K`` (mass of the top-k distribution on the distinct previous
128 targets, with and without the true token; the first position of a block has
no previous target) and ``nextunique_topk_K`` (distinct ids drawn from it);
``--singletoken-topp P`` does the same for the nucleus, whose probabilities are
not renormalised (as the original). Returns the metrics and, per block, the
predicted and target ids.

Completion pass (:func:`completion_pass`): blocks of ``prefix_length *
prefixes_per_block`` tokens, one block per batch; the block's input ids are cut
into prefixes (remainder dropped), blocks shorter than one prefix are skipped,
and each prefix is continued by :mod:`.decoding`. ``num_samples = N`` stops
after block index ``N``.

Blocks come in file order. (The original's fairseq iterator ordered them by
length with ties shuffled; that changes only the line order of the text files
and which blocks ``--num-samples`` keeps, not a metric.)
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from ..generation import top_k_top_p_filtering
from ..metrics import (RANKING_METRIC_NAMES, aggregate_ranking_metrics,
                       ranking_metrics_from_ranks, token_statistics)
from .decoding import beam_continuations, continue_prefixes, contrastive_continuations
from .loading import LoadedModel, iterate_blocks, load_blocks

logger = logging.getLogger(__name__)

PAD_LOGIT = -1e19  # the original's value for the padding logit in the single-token pass
CONTEXT = 128  # previous targets seen by the top-k / top-p repeat masses
ROW_BLOCK = 256  # rows of (rows, V) temporaries at a time


# --------------------------------------------------------------------------- #
# Single-token pass
# --------------------------------------------------------------------------- #

def _previous_target_ids(targets: torch.Tensor, context: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position ``t``: the distinct ids among ``targets[max(0, t-context):t]``,
    as ``(ids, valid)`` of shape ``(T, context)`` (each distinct id valid once)."""
    windows = F.pad(targets, (context, 0), value=-1).unfold(0, context, 1)[: targets.numel()]
    ids, _ = windows.sort(dim=1)
    valid = ids >= 0
    valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]
    return ids.clamp(min=0), valid


def _window_mass(probs: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> float:
    """Summed mass of ``probs (T, V)`` on each row's valid ``ids``."""
    return float((probs.gather(1, ids) * valid).sum())


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with the tokens outside the nucleus set to 0 (not renormalised):
    a sorted token is kept when the mass before it is below ``top_p`` (the
    original's ``_sample_topp``: the tokens whose cumulative mass is ``< p``,
    plus one)."""
    sorted_probs, order = probs.sort(dim=1, descending=True)
    below = sorted_probs.cumsum(dim=1) < top_p
    keep_sorted = torch.cat([torch.ones_like(below[:, :1]), below[:, :-1]], dim=1)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return probs * keep


def _extras(logits: torch.Tensor, targets: torch.Tensor, ids, valid, *, top_k: int, top_p: float,
            generator: torch.Generator | None, sums: dict, drawn: dict) -> None:
    """Add one row block's top-k / top-p masses to ``sums`` and draws to ``drawn``."""
    distributions = {}
    if top_k > 1:
        distributions[f"topk_{top_k}"] = F.softmax(top_k_top_p_filtering(logits, top_k=top_k), dim=1)
    if top_p > 0.0:
        distributions[f"topp_{top_p}"] = _nucleus(F.softmax(logits, dim=1), top_p)
    for name, probs in distributions.items():
        kind = name.split("_")[0]
        value = name[len(kind) + 1:]
        true_mass = probs.gather(1, targets[:, None])
        sums[f"true_{kind}_{value}_prob"] += float(true_mass.sum())
        sums[f"repeat_{name}"] += _window_mass(probs, ids, valid)
        wrong = probs.scatter(1, targets[:, None], 0.0)
        sums[f"wrepeat_{name}"] += _window_mass(wrong, ids, valid)
        sample = torch.multinomial(probs.to(generator.device) if generator is not None else probs,
                                   1, generator=generator)
        drawn[f"nextunique_{name}"].update(sample.view(-1).tolist())


@torch.no_grad()
def block_statistics(logits: torch.Tensor, targets: torch.Tensor, *, pad: int | None,
                     top_k: int = 1, top_p: float = 0.0, generator=None, sums=None, drawn=None):
    """One block's ``(ranking logging output, predictions, nll sum, wrong mass)``,
    ``logits (T, V)``, ``targets (T,)``; top-k / top-p masses go to ``sums`` / ``drawn``."""
    logits = logits.float().clone()
    if pad is not None and 0 <= pad < logits.size(-1):
        logits[:, pad] = PAD_LOGIT
    stats = token_statistics(logits, targets)
    log = ranking_metrics_from_ranks(stats["higher"], stats["predictions"], targets,
                                     ntokens=targets.numel())
    wrong_mass = 0.0
    extras = top_k > 1 or top_p > 0.0
    if extras:
        ids, valid = _previous_target_ids(targets)
    for start in range(0, targets.numel(), ROW_BLOCK):
        rows = logits[start:start + ROW_BLOCK]
        target = targets[start:start + ROW_BLOCK]
        above = rows > rows.gather(1, target[:, None])
        wrong_mass += float((F.softmax(rows, dim=1) * above).sum())
        if extras:
            _extras(rows, target, ids[start:start + ROW_BLOCK], valid[start:start + ROW_BLOCK],
                    top_k=top_k, top_p=top_p, generator=generator, sums=sums, drawn=drawn)
    return log, stats["predictions"], float(stats["nll"].sum()), wrong_mass


@torch.no_grad()
def single_token_pass(loaded: LoadedModel, split: str, block_length: int, *, top_k: int = 1,
                      top_p: float = 0.0, blocks_per_batch: int = 1, seed: int = 42,
                      progress: bool = True) -> tuple[dict, list, list]:
    """``(metrics, predictions, targets)`` of the split (see the module doc);
    predictions and targets are lists of ids per block."""
    dataset = load_blocks(loaded, split, block_length)
    pad = loaded.dictionary.pad()
    device = loaded.device
    generator = torch.Generator(device=device).manual_seed(seed)
    logs, predictions, targets = [], [], []
    nll_sum, wrong_mass_sum, ntokens = 0.0, 0.0, 0
    sums, drawn = defaultdict(float), defaultdict(set)
    bar = progress_bar(progress, len(dataset), "Single-token", "block")
    for batch in iterate_blocks(dataset, blocks_per_batch):
        net_input = {k: v.to(device) for k, v in batch["net_input"].items()}
        logits = loaded.model(**net_input)[0]
        for row, target in enumerate(batch["target"].to(device)):
            length = int((target != pad).sum())  # a short last block is right-padded
            target = target[:length]
            log, predicted, nll, wrong_mass = block_statistics(
                logits[row, :length], target, pad=pad, top_k=top_k, top_p=top_p,
                generator=generator, sums=sums, drawn=drawn)
            logs.append(log)
            predictions.append(predicted.tolist())
            targets.append(target.tolist())
            nll_sum += nll
            wrong_mass_sum += wrong_mass
            ntokens += length
        if bar is not None:
            bar.update(batch["target"].size(0))
    if bar is not None:
        bar.close()
    if ntokens == 0:
        from ..errors import UserError

        raise UserError(f"split {split!r} holds no tokens to evaluate")
    aggregated = aggregate_ranking_metrics(logs)
    metrics = {name: aggregated[name] for name in RANKING_METRIC_NAMES}
    for key, value in sums.items():
        metrics[key] = value / ntokens
    for key, ids in drawn.items():
        metrics[key] = len(ids)
    metrics["ppl"] = math.pow(2, nll_sum / ntokens / math.log(2))
    metrics["avg_wrong_mass"] = wrong_mass_sum / ntokens
    return metrics, predictions, targets


# --------------------------------------------------------------------------- #
# Completion pass
# --------------------------------------------------------------------------- #

def cut_prefixes(block: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """A ``(1, L)`` block of input ids as rows of ``prefix_length`` ids, the
    remainder dropped (the original's ``batch_input_sequence_by_prefix_length``)."""
    kept = block.size(1) // prefix_length * prefix_length
    return block[:, :kept].reshape(-1, prefix_length)


@torch.no_grad()
def completion_pass(loaded: LoadedModel, split: str, *, prefix_length: int, prefixes_per_block: int,
                    completion_length: int, top_k: int = 1, top_p: float = 0.0, beam_size: int = 1,
                    beam_ngram_block: int = 0, num_samples: int = -1, seed: int = 42,
                    penalty_alpha: float | None = None, progress: bool = True,
                    references: list | None = None) -> list[list[int]]:
    """Prefix + continuation ids of every prefix of the split (see the module doc);
    contrastive search with ``penalty_alpha``. ``references``, a list, receives the
    true continuation ids of each prefix (the ``completion_length`` ids after it in
    the blocks read, fewer at the end)."""
    dataset = load_blocks(loaded, split, prefix_length * prefixes_per_block)
    dictionary = loaded.dictionary
    device = loaded.device
    generator = torch.Generator(device=device).manual_seed(seed)
    # The original re-pointed EOS at the dictionary's last symbol before generating,
    # so its generator never ended a completion early; a gpt2_pretrained model's EOS
    # is its end-of-text id (banned until the full length either way).
    eos = dictionary.eos() if loaded.is_gpt2 else len(dictionary) - 1
    completions: list[list[int]] = []
    stream: list[int] = []  # the blocks' ids read back to back
    starts: list[tuple[int, int]] = []  # per block with prefixes: its offset, its prefixes
    total = len(dataset) if num_samples < 0 else min(len(dataset), num_samples + 1)
    bar = progress_bar(progress, total, "Completions", "block")
    for index, batch in enumerate(iterate_blocks(dataset, 1)):
        block = batch["net_input"]["src_tokens"]
        if block.size(1) >= prefix_length:
            prefixes = cut_prefixes(block, prefix_length).to(device)
            if penalty_alpha is not None:
                continuations = contrastive_continuations(
                    loaded.model, prefixes, completion_length, penalty_alpha=penalty_alpha,
                    top_k=top_k, pad=dictionary.pad()).tolist()
            elif beam_size > 1:
                continuations = beam_continuations(
                    loaded.model, dictionary, prefixes, completion_length, beam_size=beam_size,
                    ngram_block=beam_ngram_block, eos=eos)
            else:
                continuations = continue_prefixes(
                    loaded.model, prefixes, completion_length, top_k=top_k, top_p=top_p,
                    pad=dictionary.pad(), generator=generator).tolist()
            completions += [prefix + continuation
                            for prefix, continuation in zip(prefixes.tolist(), continuations)]
            starts.append((len(stream), prefixes.size(0)))
        stream += block[0].tolist()
        if bar is not None:
            bar.update(1)
        if index == num_samples:
            break
    if bar is not None:
        bar.close()
    if references is not None:
        for offset, count in starts:
            for row in range(count):
                start = offset + (row + 1) * prefix_length
                references.append(stream[start:start + completion_length])
    return completions


def progress_bar(progress: bool, total: int, desc: str, unit: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)
