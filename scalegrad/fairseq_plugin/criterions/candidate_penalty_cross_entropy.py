"""``candidate_penalty_cross_entropy``: token-level unlikelihood training
(Welleck et al., 2019) as a fairseq criterion."""

import math
from dataclasses import dataclass, field
from typing import Optional

from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ...unlikelihood import candidate_penalty_loss
from .token_metrics import (
    TOKEN_METRIC_KEYS,
    TokenMetricsSchedule,
    interval_field,
    model_scores,
    reduce_token_metrics,
    token_metrics_logging,
)

CANDIDATE_TYPES = ChoiceEnum(["prev_context"])


def candidate_type_field():
    """``--candidate-type``, declared by this criterion and by the task
    ``language_modeling_with_generation`` as in the original: ``prev_context``
    (the previous targets) is its only choice."""
    return field(
        default="prev_context",
        metadata={"help": "the token-level candidates: prev_context (the previous targets "
                          "other than the current one), the only choice, as in the original"},
    )


@dataclass
class CandidatePenaltyCrossEntropyConfig(FairseqDataclass):
    candidate_type: CANDIDATE_TYPES = candidate_type_field()
    rank_alpha: float = field(
        default=1.0,
        metadata={"help": "weight of the candidate penalty (the paper's alpha), >= 0"},
    )
    candidates_per_row: bool = field(
        default=False,
        metadata={
            "help": "build the candidates within each row of the batch, without "
            "padding (the original flattens the batch into one sequence, so "
            "candidates cross rows, and penalises the padding id everywhere)"
        },
    )
    compute_metrics_interval: int = interval_field()
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("candidate_penalty_cross_entropy", dataclass=CandidatePenaltyCrossEntropyConfig)
class CandidatePenaltyCrossEntropyCriterion(FairseqCriterion):
    """NLL plus ``alpha * sum -log(clamp(1 - p(c), min=1e-5))`` over the
    candidates ``c`` of each position: the previous targets other than the
    current one.

    Logs ``loss`` (the NLL part only, bits), ``custom_loss`` (the penalty,
    unweighted, bits), ``nll_loss`` when the sample size is not the token
    count, ``ppl`` and the token-level metrics.

    ``forward(..., compute_custom_metrics=None)``: the original's keyword; True or
    False decides, None follows ``--compute-metrics-interval``.
    """

    def __init__(self, task, candidate_type="prev_context", rank_alpha=1.0,
                 candidates_per_row=False, compute_metrics_interval=1, sentence_avg=False):
        super().__init__(task)
        if str(candidate_type) != "prev_context":
            raise ValueError(f"--candidate-type (criterion.candidate_type) must be 'prev_context', "
                             f"got {candidate_type!r}")
        self.candidate_type = str(candidate_type)
        if rank_alpha is None or not (math.isfinite(rank_alpha) and rank_alpha >= 0):
            raise ValueError(f"--rank-alpha (criterion.rank_alpha) must be a number >= 0, got {rank_alpha}")
        self.rank_alpha = float(rank_alpha)
        self.candidates_per_row = candidates_per_row
        self.sentence_avg = sentence_avg
        self.metrics_schedule = TokenMetricsSchedule(compute_metrics_interval)

    def forward(self, model, sample, reduce=True, compute_custom_metrics: Optional[bool] = None):
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        lprobs = model.get_normalized_probs(net_output, log_probs=True)
        nll, penalty = candidate_penalty_loss(
            lprobs.reshape(-1, lprobs.size(-1)),
            target.reshape(-1),
            padding_idx=self.padding_idx,
            row_length=target.size(1) if self.candidates_per_row else None,
            ignore_padding=self.candidates_per_row,
        )
        loss = nll + self.rank_alpha * penalty

        ntokens = int((target != self.padding_idx).sum())
        nsentences = target.size(0)
        sample_size = nsentences if self.sentence_avg else ntokens
        logging_output = {
            "loss": nll.data,
            "custom_loss": penalty.data,
            "ntokens": ntokens,
            "nsentences": nsentences,
            "sample_size": sample_size,
        }
        logging_output.update(
            token_metrics_logging(
                model_scores(model, net_output), target, self.padding_idx,
                compute=self.metrics_schedule(model, compute_custom_metrics),
            )
        )
        return loss, sample_size, logging_output

    @staticmethod
    def logging_keys():
        return ["loss", "custom_loss", "ntokens", "nsentences", "sample_size"] + TOKEN_METRIC_KEYS

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        custom_sum = sum(log.get("custom_loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size > 0:
            metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
            metrics.log_scalar("custom_loss", custom_sum / sample_size / math.log(2), sample_size, round=3)
        if ntokens > 0 and sample_size != ntokens:
            metrics.log_scalar("nll_loss", loss_sum / ntokens / math.log(2), ntokens, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        elif sample_size > 0:
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["loss"].avg))
        reduce_token_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
