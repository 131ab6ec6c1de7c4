"""``contrastive_token`` and ``simctg``: the objectives ScaleGrad is compared with, as
fairseq criteria (``docs/objectives.md``), for any task whose samples have targets.

Both train with cross-entropy plus a term computed by the core
(:mod:`scalegrad.contrastive`) and log what the ``scalegrad`` criterion logs (``loss``,
``nll_loss``, ``ppl``, the token-level metrics) plus the term (``ct_loss`` /
``simctg_loss``, bits). The term is a mean over the batch (as the papers define it); the
criterion returns ``nll_sum + term x sample_size`` so that fairseq's division by the
sample size gives ``CE mean + term`` for one batch (across workers and accumulated
batches: the sample-size-weighted mean of the batches' terms).
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ...contrastive import (check_ct_argument, check_margin, contrastive_token_loss,
                            simctg_contrastive_loss)
from ...hf import unwrap
from .token_metrics import (TOKEN_METRIC_KEYS, TokenMetricsSchedule, interval_field, model_scores,
                            reduce_token_metrics, token_metrics_logging)

__all__ = ["ContrastiveTokenCriterion", "SimCTGCriterion", "ContrastiveTokenCriterionConfig",
           "SimCTGCriterionConfig"]


class _CrossEntropyPlusTerm(FairseqCriterion):
    """Cross-entropy plus ``self.term_name``'s term; subclasses compute ``(net_output,
    term)`` in :meth:`forward_term`."""

    term_name = ""

    def __init__(self, task, compute_metrics_interval=1, sentence_avg=False):
        super().__init__(task)
        self.sentence_avg = sentence_avg
        self.metrics_schedule = TokenMetricsSchedule(compute_metrics_interval)

    def forward_term(self, model, sample):
        raise NotImplementedError

    def forward(self, model, sample, reduce=True, compute_custom_metrics: Optional[bool] = None):
        net_output, term = self.forward_term(model, sample)
        target = model.get_targets(sample, net_output)
        scores = model_scores(model, net_output)
        nll_loss = F.cross_entropy(scores.reshape(-1, scores.size(-1)).float(), target.reshape(-1),
                                   ignore_index=self.padding_idx, reduction="sum")
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        term_sum = term * sample_size
        loss = nll_loss + term_sum
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll_loss.data,
            self.term_name: term_sum.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        logging_output.update(token_metrics_logging(
            scores, target, self.padding_idx,
            compute=self.metrics_schedule(model, compute_custom_metrics)))
        return loss, sample_size, logging_output

    @classmethod
    def logging_keys(cls):
        return ["loss", "nll_loss", cls.term_name, "ntokens", "nsentences",
                "sample_size"] + TOKEN_METRIC_KEYS

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size, ntokens = total("sample_size"), total("ntokens")
        if sample_size > 0:
            metrics.log_scalar("loss", total("loss") / sample_size / math.log(2), sample_size,
                               round=3)
            metrics.log_scalar(cls.term_name, total(cls.term_name) / sample_size / math.log(2),
                               sample_size, round=3)
        if ntokens > 0:
            metrics.log_scalar("nll_loss", total("nll_loss") / ntokens / math.log(2), ntokens,
                               round=3)
            metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg))
        reduce_token_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


# --------------------------------------------------------------------------- #
# contrastive_token
# --------------------------------------------------------------------------- #

@dataclass
class ContrastiveTokenCriterionConfig(FairseqDataclass):
    ct_length: float = field(
        default=0.25,
        metadata={"help": "the leading positions of each row the contrastive-token term scores: "
                          "a fraction of the row (<= 1) or a count (> 1), as ct-loss's ct_length"},
    )
    ct_preced_m_negatives: float = field(
        default=0.5,
        metadata={"help": "how many preceding targets are each position's negatives: a fraction "
                          "of the CT length (<= 1) or a count (> 1), as ct-loss's "
                          "preced_m_negatives"},
    )
    compute_metrics_interval: int = interval_field()
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("contrastive_token", dataclass=ContrastiveTokenCriterionConfig)
class ContrastiveTokenCriterion(_CrossEntropyPlusTerm):
    """Cross-entropy plus the contrastive-token term of Jiang et al. (2022)
    (:func:`scalegrad.contrastive.contrastive_token_loss`); the padding id is both
    ``ignore_index`` and ``pad_id``. Logs ``ct_loss`` beside the ``scalegrad``
    criterion's metrics."""

    term_name = "ct_loss"

    def __init__(self, task, ct_length=0.25, ct_preced_m_negatives=0.5,
                 compute_metrics_interval=1, sentence_avg=False):
        super().__init__(task, compute_metrics_interval, sentence_avg)
        self.ct_length = check_ct_argument(ct_length, "--ct-length (criterion.ct_length)")
        self.preced_m_negatives = check_ct_argument(
            ct_preced_m_negatives, "--ct-preced-m-negatives (criterion.ct_preced_m_negatives)")

    def forward_term(self, model, sample):
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        term = contrastive_token_loss(
            model_scores(model, net_output), target, ignore_index=self.padding_idx,
            pad_id=self.padding_idx, ct_length=self.ct_length,
            preced_m_negatives=self.preced_m_negatives)
        return net_output, term


# --------------------------------------------------------------------------- #
# simctg
# --------------------------------------------------------------------------- #

@dataclass
class SimCTGCriterionConfig(FairseqDataclass):
    simctg_margin: float = field(
        default=0.5,
        metadata={"help": "the margin rho of SimCTG's contrastive loss, >= 0 (the paper: 0.5)"},
    )
    compute_metrics_interval: int = interval_field()
    sentence_avg: bool = II("optimization.sentence_avg")


@register_criterion("simctg", dataclass=SimCTGCriterionConfig)
class SimCTGCriterion(_CrossEntropyPlusTerm):
    """SimCTG (Su et al., 2022): cross-entropy plus the margin loss on the cosine
    similarities of the decoder's final hidden states
    (:func:`scalegrad.contrastive.simctg_contrastive_loss`), at the positions whose
    targets are not padding. One forward pass: the features (``features_only=True``),
    then the decoder's output layer on them. Logs ``simctg_loss``."""

    term_name = "simctg_loss"

    def __init__(self, task, simctg_margin=0.5, compute_metrics_interval=1, sentence_avg=False):
        super().__init__(task, compute_metrics_interval, sentence_avg)
        self.margin = check_margin(simctg_margin, name="--simctg-margin (criterion.simctg_margin)")
        self._checked_model = None

    def _check_model(self, model, sample):
        """A ``gpt2_pretrained`` model's logits must be its output layer of the features."""
        inner = unwrap(model)
        if inner is self._checked_model:
            return
        check = getattr(inner, "check_output_projection", None)
        if check is not None:
            try:
                check(sample["net_input"]["src_tokens"][:1, :16])
            except ValueError as exc:
                raise ValueError(f"--criterion simctg needs logits that are the output layer of "
                                 f"the final hidden states; this model's are not: {exc}") from None
        self._checked_model = inner

    def forward_term(self, model, sample):
        self._check_model(model, sample)
        # Through the model's (wrapper's) forward, so DDP sees the pass.
        features, extra = model(**sample["net_input"], features_only=True)
        net_output = (unwrap(model).decoder.output_layer(features), extra)
        valid = sample["target"] != self.padding_idx
        return net_output, simctg_contrastive_loss(features, valid, margin=self.margin)

