"""``scalegrad``: the ScaleGrad objective (Lin, Han and Joty, ICML 2021) as a
fairseq criterion, for any task whose samples have targets."""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ..losses import check_gamma, scalegrad_loss
from .token_metrics import (
    TOKEN_METRIC_KEYS,
    TokenMetricsSchedule,
    model_scores,
    reduce_token_metrics,
    token_metrics_logging,
)


@dataclass
class ScaleGradCriterionConfig(FairseqDataclass):
    gamma: float = field(
        default=0.2,
        metadata={
            "help": "scale of the novel tokens' probabilities, > 0 (the paper uses "
            "0.2, 0.5 or 0.8; 1.0 is maximum likelihood)"
        },
    )
    sg_eps: float = field(
        default=1e-8,
        metadata={"help": "added to every rescaled probability before normalising"},
    )
    compute_metrics_interval: int = field(
        default=250,
        metadata={
            "help": "compute the token-level ranking metrics on every N-th training "
            "step (always in validation; 0: only in validation)"
        },
    )
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("scalegrad", dataclass=ScaleGradCriterionConfig)
class ScaleGradCriterion(FairseqCriterion):
    """ScaleGrad: at each position the probabilities of the novel tokens (those
    not among the row's previous targets) are scaled by ``gamma`` and the
    distribution renormalised; the loss is the NLL of the target under it.

    Logs ``loss`` (the ScaleGrad objective, bits per sample-size unit),
    ``nll_loss`` (the plain NLL of the model's own distribution, bits per
    token), ``ppl`` (from ``nll_loss``) and the token-level metrics.
    """

    def __init__(self, task, gamma=0.2, sg_eps=1e-8, compute_metrics_interval=250,
                 sentence_avg=False):
        super().__init__(task)
        self.gamma = check_gamma(gamma, name="--gamma (criterion.gamma)")
        if not (math.isfinite(sg_eps) and sg_eps >= 0):
            raise ValueError(f"--sg-eps (criterion.sg_eps) must be a number >= 0, got {sg_eps}")
        self.eps = float(sg_eps)
        self.sentence_avg = sentence_avg
        self.metrics_schedule = TokenMetricsSchedule(compute_metrics_interval)

    def forward(self, model, sample, reduce=True, compute_metrics: Optional[bool] = None):
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        scores = model_scores(model, net_output)
        loss = scalegrad_loss(
            scores, target, self.gamma, ignore_index=self.padding_idx, eps=self.eps,
            reduction="sum",
        )
        with torch.no_grad():
            nll_loss = self.nll(scores, target)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        logging_output.update(
            token_metrics_logging(
                scores, target, self.padding_idx,
                compute=self.metrics_schedule(model, compute_metrics),
            )
        )
        return loss, sample_size, logging_output

    def nll(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed natural-log NLL of the targets under softmax(scores)."""
        scores = scores.reshape(-1, scores.size(-1)).float()
        target = target.reshape(-1)
        valid = target != self.padding_idx
        target_scores = scores.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        nll = torch.logsumexp(scores, dim=1) - target_scores
        return nll.masked_fill(~valid, 0.0).sum()

    @staticmethod
    def logging_keys():
        return ["loss", "nll_loss", "ntokens", "nsentences", "sample_size"] + TOKEN_METRIC_KEYS

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
        nll_sum = sum(log.get("nll_loss", 0) for log in logging_outputs)
        ntokens = sum(log.get("ntokens", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size > 0:
            metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        if ntokens > 0:
            metrics.log_scalar("nll_loss", nll_sum / ntokens / math.log(2), ntokens, round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        reduce_token_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
