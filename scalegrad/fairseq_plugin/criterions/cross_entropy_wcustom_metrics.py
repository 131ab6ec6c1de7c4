"""``cross_entropy_wcustom_metrics``: fairseq's cross-entropy plus the
token-level metrics of ``docs/reference.md``, section 2 (the unlikelihood module's baseline)."""

from dataclasses import dataclass
from typing import Optional

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig

from .token_metrics import (
    TOKEN_METRIC_KEYS,
    TokenMetricsSchedule,
    interval_field,
    model_scores,
    reduce_token_metrics,
    token_metrics_logging,
)


@dataclass
class CrossEntropyWCustomMetricsConfig(CrossEntropyCriterionConfig):
    compute_metrics_interval: int = interval_field()


@register_criterion("cross_entropy_wcustom_metrics", dataclass=CrossEntropyWCustomMetricsConfig)
class CrossEntropyWCustomMetricsCriterion(CrossEntropyCriterion):
    """Cross-entropy (loss in bits, ``nll_loss`` when the sample size is not the
    token count, ``ppl``) and the token-level metrics: ``target_rank``,
    ``median_target_rank``, ``hits_at_1`` (the paper's acc), ``hits_at_10``,
    ``repeat_at_1/{l}``, ``wrong_repeat_at_1/{l}``, ``human_repeat_at_1/{l}``.

    ``forward(..., compute_custom_metrics=None)``: the original's keyword; True or
    False decides, None follows ``--compute-metrics-interval``."""

    def __init__(self, task, sentence_avg, compute_metrics_interval=1):
        super().__init__(task, sentence_avg)
        self.metrics_schedule = TokenMetricsSchedule(compute_metrics_interval)

    def forward(self, model, sample, reduce=True, compute_custom_metrics: Optional[bool] = None):
        net_output = model(**sample["net_input"])
        loss, _ = self.compute_loss(model, net_output, sample, reduce=reduce)
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        target = model.get_targets(sample, net_output)
        logging_output.update(
            token_metrics_logging(
                model_scores(model, net_output), target, self.padding_idx,
                compute=self.metrics_schedule(model, compute_custom_metrics),
            )
        )
        return loss, sample_size, logging_output

    @staticmethod
    def logging_keys():
        return ["loss", "ntokens", "nsentences", "sample_size"] + TOKEN_METRIC_KEYS

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        CrossEntropyCriterion.reduce_metrics(logging_outputs)
        reduce_token_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
