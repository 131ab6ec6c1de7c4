"""The paper's metrics, one implementation for every driver.

Token level (``docs/reference.md``, section 2): ranks of the targets, hits, ``repeat_at_1`` within
context windows, aggregated into ppl / acc / rep / wrep / uniq. Sequence level
(section 3): ``pct_repeat_{N}grams`` of continuations (seq-rep-N), in BPE
tokens and in words, and uniq-seq. The fairseq criteria and the GPT-2
evaluator both call these functions.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "REPEAT_CONTEXT_LENGTHS",
    "RANKING_METRIC_NAMES",
    "ranking_metrics",
    "ranking_metrics_from_ranks",
    "token_statistics",
    "repeat_at_1",
    "aggregate_ranking_metrics",
    "aggregate_sequence_metrics",
    "ngram_metric_sums",
    "token_level_summary",
    "ngram_metrics",
    "NgramMetrics",
    "split_words",
    "clean_up_tokenization",
    "text_continuation_words",
    "continuation_text",
    "decode_text",
    "CompletionMetrics",
]

REPEAT_CONTEXT_LENGTHS = (16, 32, 128, 512)

RANKING_METRIC_NAMES = ["target_rank", "median_target_rank", "hits_at_1", "hits_at_10"]
for _l in REPEAT_CONTEXT_LENGTHS:
    RANKING_METRIC_NAMES += [f"repeat_at_1/{_l}", f"wrong_repeat_at_1/{_l}", f"human_repeat_at_1/{_l}"]
del _l

# Words as the original counts them (ParlAI's tokenizer regex).
WORD_RE = re.compile(r"\w+|[^\w\s]|\n", re.UNICODE)


# --------------------------------------------------------------------------- #
# Token-level ("single-token") metrics
# --------------------------------------------------------------------------- #

def _previous_windows(targets: torch.Tensor, context_length: int) -> torch.Tensor:
    """``(T, context_length)`` view whose row ``t`` holds ``y[t-l .. t-1]``,
    with ``-1`` where that reaches before the start."""
    padded = F.pad(targets, (context_length, 0), value=-1)
    return padded.unfold(0, context_length, 1)[: targets.numel()]


def _repeat_counts(predictions, targets, context_length):
    """``(repeat, wrong_repeat, human_repeat)`` as 0-d tensors (see repeat_at_1)."""
    windows = _previous_windows(targets, context_length)
    pred_in_window = (windows == predictions.unsqueeze(1)).any(dim=1)
    return (
        pred_in_window.sum(),
        (pred_in_window & (predictions != targets)).sum(),
        (windows == targets.unsqueeze(1)).any(dim=1).sum(),
    )


@torch.no_grad()
def repeat_at_1(logits: torch.Tensor, targets: torch.Tensor, context_length: int) -> tuple[int, int, int]:
    """Counts ``(repeat, wrong_repeat, human_repeat)`` over the positions of one
    flat sequence: the argmax prediction occurs among the ``context_length``
    previous targets; ... and is also wrong; the target itself occurs there.

    ``logits`` is ``(T, V)``, ``targets`` ``(T,)``. Equal to the original's
    ``(T, T)`` construction, with an ``(T, l)`` window instead.
    """
    targets = targets.reshape(-1)
    return tuple(int(c) for c in _repeat_counts(logits.argmax(dim=-1), targets, context_length))


@torch.no_grad()
def ranking_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ntokens: int | None = None,
    context_lengths: Sequence[int] = REPEAT_CONTEXT_LENGTHS,
) -> dict:
    """Summed token-level metrics of one flat sequence (``logits (T, V)``,
    ``targets (T,)``), as the original ``TrainingMetrics.ranking_metrics``.

    ``target_rank`` counts, per position, the vocabulary entries whose logit is
    strictly greater than the target's; ``median_target_rank`` is
    ``torch.median`` of those counts (the lower middle value for an even
    count); ``normalizer`` is ``ntokens`` (default ``T``).
    """
    targets = targets.reshape(-1)
    logits = logits.reshape(targets.numel(), -1)
    stats = token_statistics(logits, targets, nll=False)
    return ranking_metrics_from_ranks(stats["higher"], stats["predictions"], targets, ntokens=ntokens,
                                      context_lengths=context_lengths)


@torch.no_grad()
def token_statistics(logits: torch.Tensor, targets: torch.Tensor, *, nll: bool = True,
                     ranks: bool = True, block_size: int = 256) -> dict:
    """Per position of ``logits (T, V)`` and ``targets (T,)``: ``nll`` (natural-log
    NLL of the target under the softmax, in float32 or float64), ``higher`` (how
    many logits are strictly greater than the target's) and ``predictions``
    (the argmax); ``nll=False`` or ``ranks=False`` leave out the first or the
    other two.

    Computed ``block_size`` rows at a time, so each row block stays in cache
    across the passes and no ``(T, V)`` temporary is made: about twice as fast
    on a CPU as the whole-tensor operations, with the same values (each is a
    per-row operation).
    """
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    parts: dict[str, list] = {"nll": [], "higher": [], "predictions": []}
    for start in range(0, targets.numel(), block_size):
        block = logits[start:start + block_size]
        target = targets[start:start + block_size].unsqueeze(1)
        true_logits = block.gather(1, target)
        if nll:
            lprobs = torch.log_softmax(block, dim=1, dtype=compute_dtype)
            parts["nll"].append(-lprobs.gather(1, target).squeeze(1))
        if ranks:
            parts["higher"].append((block > true_logits).sum(dim=1))
            parts["predictions"].append(block.argmax(dim=1))
    empty = {"nll": logits.new_zeros(0, dtype=compute_dtype), "higher": targets.new_zeros(0),
             "predictions": targets.new_zeros(0)}
    wanted = {"nll": nll, "higher": ranks, "predictions": ranks}
    return {key: torch.cat(values) if values else empty[key]
            for key, values in parts.items() if wanted[key]}


@torch.no_grad()
def ranking_metrics_from_ranks(
    higher: torch.Tensor,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    *,
    ntokens: int | None = None,
    context_lengths: Sequence[int] = REPEAT_CONTEXT_LENGTHS,
) -> dict:
    """:func:`ranking_metrics` from what it needs of the logits: per position
    the count of logits strictly above the target's (``higher``) and the
    argmax (``predictions``), so a caller can compute them chunk by chunk
    without the full ``(T, V)`` logits."""
    targets = targets.reshape(-1)
    counts = [
        higher.sum(),
        (higher == 0).sum(),
        (higher < 10).sum(),
        higher.median() if higher.numel() else higher.new_zeros(()),
    ]
    for length in context_lengths:
        counts += _repeat_counts(predictions, targets, length)
    # One device-to-host copy for all the counts.
    values = [float(v) for v in torch.stack(counts).tolist()]
    out = {
        "target_rank": values[0],
        "hits_at_1": values[1],
        "hits_at_10": values[2],
        "median_target_rank": values[3],
        "normalizer": float(targets.numel() if ntokens is None else ntokens),
    }
    for i, length in enumerate(context_lengths):
        rep, wrong_rep, human_rep = values[4 + 3 * i: 7 + 3 * i]
        out[f"repeat_at_1/{length}"] = rep
        out[f"wrong_repeat_at_1/{length}"] = wrong_rep
        out[f"human_repeat_at_1/{length}"] = human_rep
    return out


def aggregate_ranking_metrics(logging_outputs: Sequence[dict]) -> dict:
    """Aggregate per-chunk logging outputs as the original
    ``CrossEntropyCriterionWCustomMetrics.aggregate_logging_outputs``.

    ``loss`` is ``sum(loss) / sum(sample_size) / ln 2`` (bits); every summed
    metric is divided by ``sum(normalizer)``; ``median_target_rank`` is the
    mean of the chunk medians; ``nll_loss`` appears when the sample size is not
    the token count.
    """
    loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
    nsentences = sum(log.get("nsentences", 0) for log in logging_outputs)
    sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
    out = {
        "loss": loss_sum / sample_size / math.log(2) if sample_size > 0 else 0.0,
        "ntokens": ntokens,
        "nsentences": nsentences,
        "sample_size": sample_size,
    }
    normalizer = sum(log.get("normalizer", 0) for log in logging_outputs)
    if normalizer:
        for name in RANKING_METRIC_NAMES:
            if name == "median_target_rank":
                medians = [log[name] for log in logging_outputs if name in log]
                out[name] = float(np.mean(medians)) if medians else float("nan")
            else:
                out[name] = sum(log.get(name, 0) for log in logging_outputs) / normalizer
    if sample_size != ntokens:
        out["nll_loss"] = loss_sum / ntokens / math.log(2) if ntokens > 0 else 0.0
    return out


def aggregate_sequence_metrics(logging_outputs: Sequence[dict]) -> dict:
    """The sequence-level training metrics (``seq_*``) of per-step logging outputs
    (``seq_loss``, ``seq_ntokens``, ``seq_nsentences``, ``seq_sample_size``,
    ``seq_repeat_mask`` and :func:`ngram_metric_sums`' ``pct_repeat_{N}grams``), as
    the parent script's ``SequencePenaltyCriterion.aggregate_logging_outputs``:
    ``seq_loss`` in bits per generated token, ``seq_repeat_mask`` the share of
    penalised tokens, ``seq_pct_repeat_{N}grams`` the mean over continuations."""
    def total(key):
        return sum(log.get(key, 0) for log in logging_outputs)

    loss_sum, ntokens = total("seq_loss"), total("seq_ntokens")
    nsentences, sample_size = total("seq_nsentences"), total("seq_sample_size")
    out = {
        "seq_loss": loss_sum / max(sample_size, 1.0) / math.log(2),
        "seq_ntokens": ntokens,
        "seq_nsentences": nsentences,
        "seq_sample_size": sample_size,
        "seq_repeat_mask": total("seq_repeat_mask") / sample_size if sample_size > 0 else 0,
    }
    for n in range(1, 5):
        key = f"pct_repeat_{n}grams"
        out["seq_" + key] = total(key) / nsentences if nsentences > 0 else 0
    if sample_size != ntokens:
        out["seq_nll_loss"] = loss_sum / max(ntokens, 1.0) / math.log(2)
    return out


def token_level_summary(metrics: dict) -> dict:
    """The paper's names for aggregated token-level metrics:
    ``ppl``, ``acc`` (hits@1), ``rep`` and ``wrep`` (context 128)."""
    return {
        "ppl": 2 ** metrics["loss"],
        "acc": metrics.get("hits_at_1"),
        "rep": metrics.get("repeat_at_1/128"),
        "wrep": metrics.get("wrong_repeat_at_1/128"),
        "uniq": metrics.get("uniq"),
    }


# --------------------------------------------------------------------------- #
# Sequence-level ("completion") metrics
# --------------------------------------------------------------------------- #

def ngram_metrics(token_list: Sequence, pad=1) -> dict:
    """``pct_repeat_{N}grams`` for N = 1..4 of one list: ``1 - distinct / all``
    N-grams, after cutting the list at the first ``pad``.

    Difference from the original: a list with no N-gram of some N (shorter
    than N) gets 0.0 for that N, where the original divided by zero.
    """
    tokens = list(token_list)
    if pad in tokens:
        tokens = tokens[: tokens.index(pad)]
    stats = {}
    for n in range(1, 5):
        grams = list(zip(*(tokens[i:] for i in range(n))))
        stats[f"pct_repeat_{n}grams"] = 1.0 - len(Counter(grams)) / len(grams) if grams else 0.0
    return stats


def ngram_metric_sums(token_lists, pad=1) -> dict:
    """``pct_repeat_{N}grams`` for N = 1..4 summed over the lists (rows of a tensor,
    or lists of ids), each cut at its first ``pad``: :func:`ngram_metrics` per list."""
    if isinstance(token_lists, torch.Tensor):
        token_lists = token_lists.tolist()
    sums = {f"pct_repeat_{n}grams": 0.0 for n in range(1, 5)}
    for tokens in token_lists:
        for key, value in ngram_metrics(tokens, pad=pad).items():
            sums[key] += value
    return sums


class NgramMetrics:
    """Running mean of :func:`ngram_metrics` over many continuations."""

    def __init__(self, pad=1):
        self.pad = pad
        self._values: dict[str, list[float]] = defaultdict(list)

    def update(self, token_lists: Iterable[Sequence]) -> None:
        if isinstance(token_lists, torch.Tensor):
            token_lists = token_lists.tolist()
        for tokens in token_lists:
            for key, value in ngram_metrics(tokens, pad=self.pad).items():
                self._values[key].append(value)

    def report(self, kind: str = "train", round_level: int = 4) -> dict:
        """``{'{kind}/pct_repeat_{N}grams': mean rounded to round_level}``."""
        return {
            f"{kind}/{key}": round(float(np.mean(values)), round_level)
            for key, values in self._values.items()
        }

    def __len__(self) -> int:
        return len(next(iter(self._values.values()), []))


def split_words(text: str) -> list[str]:
    """Words, punctuation marks and newlines, as the original counts them."""
    return WORD_RE.findall(text)


def clean_up_tokenization(text: str) -> str:
    """The clean-up of English tokenization artifacts that pytorch-transformers
    (2019) applied in ``decode``: no space before ``. ? ! ,``, joined
    contractions, and ``" do not"`` turned into ``" don't"``. transformers 5
    ignores ``clean_up_tokenization_spaces`` for BPE tokenizers, so it is done
    here, explicitly, to decode as the original did."""
    for dirty, clean in _CLEAN_UP:
        text = text.replace(dirty, clean)
    return text


_CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _decode(tokenizer, ids: Sequence[int]) -> str:
    """Decode as the original (pytorch-transformers, clean-up on) did."""
    return clean_up_tokenization(tokenizer.decode(list(ids), clean_up_tokenization_spaces=False))


def text_continuation_words(tokenizer, completion: Sequence[int], prefix_length: int) -> list[str]:
    """The words of a continuation, as the original extracts them: decode the
    whole completion, remove every occurrence of the decoded prefix text (or,
    when it does not occur verbatim, of the prefix text without its last two
    space-separated pieces), split into words."""
    return split_words(continuation_text(tokenizer, completion, prefix_length))


def continuation_text(tokenizer, completion: Sequence[int], prefix_length: int) -> str:
    """The continuation's text whose words :func:`text_continuation_words` counts (the
    decoded completion without the decoded prefix, as the original): the text a
    driver writes as its result file's ``continuations``, so that the scorer's
    seq-rep-N on it equals the driver's (``docs/metrics-2022.md``)."""
    text = _decode(tokenizer, completion)
    prefix = _decode(tokenizer, completion[:prefix_length])
    if prefix not in text:
        prefix = " ".join(prefix.split(" ")[:-2])
    return text.replace(prefix, "") if prefix else text


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """Ids decoded as the drivers decode completions (the 2019 clean-up on): for a
    result file's ``prefixes`` and ``references`` (``docs/metrics-2022.md``)."""
    return _decode(tokenizer, ids)


class CompletionMetrics:
    """Sequence-level metrics of a split's completions (prefix + continuation ids).

    ``report(split)`` gives the original result file's ``bpe_metrics``
    (continuation ids), ``word_metrics`` (continuations in words, those of 3
    words or fewer skipped), ``uniq`` (distinct space-separated pieces of the
    decoded continuations) and ``completions`` (decoded prefix+continuation).
    """

    def __init__(self, tokenizer, prefix_length: int):
        self.tokenizer = tokenizer
        self.prefix_length = prefix_length
        self.bpe = NgramMetrics(pad=-1)
        self.words = NgramMetrics(pad=-1)
        self.unique_pieces: set[str] = set()
        self.completions: list[str] = []

    def update(self, completions) -> None:
        if isinstance(completions, torch.Tensor):
            completions = completions.tolist()
        word_lists = []
        for completion in completions:
            continuation = completion[self.prefix_length:]
            self.bpe.update([continuation])
            word_lists.append(text_continuation_words(self.tokenizer, completion, self.prefix_length))
            self.completions.append(_decode(self.tokenizer, completion))
            self.unique_pieces.update(_decode(self.tokenizer, continuation).split(" "))
        self.words.update([words for words in word_lists if len(words) > 3])

    def report(self, split: str) -> dict:
        return {
            "bpe_metrics": self.bpe.report(f"bpe_{split}"),
            "word_metrics": self.words.report(f"word_{split}"),
            "uniq": len(self.unique_pieces),
            "completions": list(self.completions),
        }
