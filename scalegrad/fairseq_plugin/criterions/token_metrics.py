"""Token-level metrics (``docs/reference.md``, section 2) for the fairseq criteria.

Every criterion here logs the same summable keys on every call, zeros when the
metrics were skipped (``normalizer == 0``), so fairseq can sum logging outputs
across micro-batches and workers: it takes the keys of the first logging
output and all-reduces them in order, so a key that only some calls log would
be dropped or would desynchronise the workers.

The median target rank is not a sum: each call logs its median under
``median_target_rank`` and a count under ``median_target_rank_count``; the
reported value is their ratio, the mean of the per-call medians, as the
original's mean over logging outputs.
"""

from dataclasses import field
from typing import Optional

import torch
from fairseq.logging import metrics

from ...metrics import RANKING_METRIC_NAMES, ranking_metrics

__all__ = [
    "TOKEN_METRIC_KEYS",
    "TokenMetricsSchedule",
    "check_interval",
    "interval_field",
    "model_scores",
    "token_metrics_logging",
    "reduce_token_metrics",
]

MEDIAN = "median_target_rank"
MEDIAN_COUNT = "median_target_rank_count"
TOKEN_METRIC_KEYS = list(RANKING_METRIC_NAMES) + ["normalizer", MEDIAN_COUNT]


def check_interval(interval: int, *, name: str = "--compute-metrics-interval") -> int:
    if interval < 0:
        raise ValueError(
            f"{name} must be >= 0 (compute the token metrics every N training "
            f"steps; 0: only in validation), got {interval}"
        )
    return int(interval)


def interval_field():
    """The metric criteria's ``--compute-metrics-interval``: 1 by default, i.e. the
    token metrics at every call, as the original criteria computed them under any
    task but ``language_modeling_with_generation``. That task declares the same
    flag (default 250; on fairseq's command line the task's declaration comes
    first, so its default wins) and passes the decision to the criterion itself."""
    return field(
        default=1,
        metadata={
            "help": "compute the token-level ranking metrics on every N-th training "
            "call (1: every call, as the original; always in validation; 0: only in "
            "validation). Under --task language_modeling_with_generation the task's "
            "--compute-metrics-interval (default 250) decides"
        },
    )


class TokenMetricsSchedule:
    """When to compute the token metrics: as the caller says
    (``compute_custom_metrics``, the original's forward keyword, passed by
    ``language_modeling_with_generation``); otherwise always in evaluation and on
    every ``interval``-th training call in training (the ``interval``-th,
    ``2 * interval``-th, ... call; every call when 1; never when 0)."""

    def __init__(self, interval: int):
        self.interval = check_interval(interval)
        self.train_calls = 0

    def __call__(self, model, compute_custom_metrics: Optional[bool] = None) -> bool:
        if compute_custom_metrics is not None:
            return bool(compute_custom_metrics)
        if not model.training:
            return True
        self.train_calls += 1
        return self.interval > 0 and self.train_calls % self.interval == 0


def model_scores(model, net_output) -> torch.Tensor:
    """``(B, T, V)`` scores whose softmax is the model's distribution: the raw
    logits, or log-probabilities when the decoder ends in an adaptive softmax
    (its first output is then a hidden state, not logits)."""
    decoder = getattr(model, "decoder", None)
    if getattr(decoder, "adaptive_softmax", None) is not None:
        return model.get_normalized_probs(net_output, log_probs=True)
    return net_output[0]


@torch.no_grad()
def token_metrics_logging(
    scores: torch.Tensor, target: torch.Tensor, padding_idx: int, *, compute: bool
) -> dict:
    """Summed ranking metrics of one batch, as ``ranking_metrics`` computes them.

    As in the original, the batch is flattened into one sequence (repeat
    windows cross row boundaries). Padding positions are left out (the
    original scored them too, while normalising by the non-padding count).
    """
    out = {key: 0.0 for key in TOKEN_METRIC_KEYS}
    if not compute:
        return out
    flat_scores = scores.detach().reshape(-1, scores.size(-1))
    flat_target = target.reshape(-1)
    keep = flat_target != padding_idx
    if not bool(keep.all()):
        flat_scores, flat_target = flat_scores[keep], flat_target[keep]
    if flat_target.numel() == 0:
        return out
    out.update(ranking_metrics(flat_scores, flat_target))
    out[MEDIAN_COUNT] = 1.0
    return out


def _sum(logging_outputs, key) -> float:
    return float(sum(log.get(key, 0) for log in logging_outputs))


def reduce_token_metrics(logging_outputs) -> None:
    """Log the token metrics of ``logging_outputs`` (nothing when none were
    computed): sums over ``normalizer``, medians over their count."""
    normalizer = _sum(logging_outputs, "normalizer")
    if normalizer <= 0:
        return
    for name in RANKING_METRIC_NAMES:
        if name == MEDIAN:
            count = _sum(logging_outputs, MEDIAN_COUNT)
            if count > 0:
                metrics.log_scalar(MEDIAN, _sum(logging_outputs, MEDIAN) / count, count, round=3)
        else:
            metrics.log_scalar(name, _sum(logging_outputs, name) / normalizer, normalizer, round=4)
