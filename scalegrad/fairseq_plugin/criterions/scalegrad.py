"""``scalegrad``: the ScaleGrad objective (Lin, Han and Joty, ICML 2021) as a
fairseq criterion, for any task whose samples have targets.

``--fused-loss`` computes the loss from the final hidden states and the output
embedding (:func:`scalegrad.fused.fused_linear_scalegrad_loss`), a chunk of
positions at a time, so the ``(batch, time, vocab)`` logits never exist at once.
It applies to ``--arch gpt2_pretrained`` (when its Hugging Face model's logits are
the hidden states times the output embedding) and to fairseq's transformer
language models (``transformer_lm``, ``transformer_lm_ul``, ...: the decoder's
``output_projection`` over the features ``features_only=True`` returns), each
checked once on the first batch; with an adaptive softmax it is refused (one
``error:`` line, exit 2: drop one of the two); with any other model the criterion
logs one warning and uses the full logits, as without the option. The criterion
cannot see the model when it is built, so this is decided at the first batch
rather than at build time. See docs/large-vocabularies.md.
"""

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II

from ...hf import unwrap
from ...fused import fused_linear_scalegrad_loss
from ...losses import check_gamma, scalegrad_loss
from ...metrics import ranking_metrics_from_ranks
from .token_metrics import (
    MEDIAN_COUNT,
    TOKEN_METRIC_KEYS,
    TokenMetricsSchedule,
    interval_field,
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
    compute_metrics_interval: int = interval_field()
    fused_loss: bool = field(
        default=False,
        metadata={
            "help": "compute the loss from the final hidden states and the output embedding, "
            "--fused-chunk-size positions at a time, without the full (batch, time, vocab) "
            "logits (the same loss and gradients). --arch gpt2_pretrained and fairseq's "
            "transformer language models (transformer_lm, transformer_lm_ul) allow it; not with "
            "an adaptive softmax; with another model the criterion warns once and uses the "
            "logits. nll_loss and the token metrics come from the same chunks of logits"
        },
    )
    fused_chunk_size: int = field(
        default=256,
        metadata={"help": "positions whose logits --fused-loss makes at a time"},
    )
    sentence_avg: bool = II("optimization.sentence_avg")


logger = logging.getLogger(__name__)


def _output_projection(inner):
    """``(weight, bias)`` with logits ``features @ weight.T (+ bias)``."""
    if hasattr(inner, "output_projection") and callable(inner.output_projection):  # gpt2_pretrained
        return inner.output_projection()
    projection = inner.decoder.output_projection
    return projection.weight, projection.bias


@torch.no_grad()
def _check_decoder_projection(model, decoder, tokens):
    """None when a fairseq decoder's logits are its output projection over the features
    ``features_only=True`` returns (evaluation mode, on ``tokens``), else why not."""
    was_training = model.training
    model.eval()
    try:
        logits = model(tokens, features_only=False)[0]
        features = model(tokens, features_only=True)[0]
    finally:
        model.train(was_training)
    projection = decoder.output_projection
    if features.shape[-1] != projection.in_features or not torch.allclose(
            projection(features), logits, rtol=1e-5, atol=1e-5):
        return "its logits are not the decoder's output projection of its features"
    return None


@register_criterion("scalegrad", dataclass=ScaleGradCriterionConfig)
class ScaleGradCriterion(FairseqCriterion):
    """ScaleGrad: at each position the probabilities of the novel tokens (those
    not among the row's previous targets) are scaled by ``gamma`` and the
    distribution renormalised; the loss is the NLL of the target under it.

    Logs ``loss`` (the ScaleGrad objective, bits per sample-size unit),
    ``nll_loss`` (the plain NLL of the model's own distribution, bits per
    token), ``ppl`` (from ``nll_loss``) and the token-level metrics.

    ``forward(..., compute_custom_metrics=None)``: as the unlikelihood module's
    criteria, True or False decides, None follows ``--compute-metrics-interval``.
    """

    def __init__(self, task, gamma=0.2, sg_eps=1e-8, compute_metrics_interval=1,
                 fused_loss=False, fused_chunk_size=256, sentence_avg=False):
        super().__init__(task)
        self.gamma = check_gamma(gamma, name="--gamma (criterion.gamma)")
        if not (math.isfinite(sg_eps) and sg_eps >= 0):
            raise ValueError(f"--sg-eps (criterion.sg_eps) must be a number >= 0, got {sg_eps}")
        self.eps = float(sg_eps)
        if int(fused_chunk_size) < 1:
            raise ValueError(f"--fused-chunk-size (criterion.fused_chunk_size) must be at least "
                             f"1, got {fused_chunk_size}")
        self.fused_loss = bool(fused_loss)
        self.fused_chunk_size = int(fused_chunk_size)
        self._fused_model = None   # the model the fused path was checked for ...
        self._fused_allowed = False  # ... and whether it allows it
        self.sentence_avg = sentence_avg
        self.metrics_schedule = TokenMetricsSchedule(compute_metrics_interval)

    def _fused_model_of(self, model, sample):
        """The (unwrapped) model when ``--fused-loss`` applies to ``model``, else None
        (with one warning per model)."""
        inner = unwrap(model)
        if inner is not self._fused_model:
            from ..models.gpt2_pretrained import GPT2PretrainedModel

            reason = None
            tokens = sample["net_input"]["src_tokens"][:1, :16]
            decoder = getattr(inner, "decoder", None)
            if getattr(decoder, "adaptive_softmax", None) is not None:
                print("error: --fused-loss (criterion.fused_loss) cannot be used with an adaptive softmax "
                      "(--adaptive-softmax-cutoff): its output is not one projection of the features; drop "
                      "--fused-loss or the adaptive softmax", file=sys.stderr, flush=True)
                # Nothing is written before the first batch. A SystemExit raised here, inside
                # fairseq's training step, ends in "terminate called without an active
                # exception" (SIGABRT) at interpreter exit: leave at once instead.
                sys.stdout.flush()
                os._exit(2)
            if isinstance(inner, GPT2PretrainedModel):
                try:
                    inner.check_output_projection(tokens)
                except ValueError as exc:
                    reason = f"its Hugging Face model does not allow it: {exc}"
            elif isinstance(getattr(decoder, "output_projection", None), torch.nn.Linear):
                reason = _check_decoder_projection(inner, decoder, tokens)
            else:
                reason = (f"the model is {type(inner).__name__}, neither --arch gpt2_pretrained nor a "
                          f"transformer language model with an output projection")
            if reason is not None:
                logger.warning("--fused-loss (criterion.fused_loss) ignored: %s; the loss is "
                               "computed from the full logits", reason)
            self._fused_model, self._fused_allowed = inner, reason is None
        return inner if self._fused_allowed else None

    def forward(self, model, sample, reduce=True, compute_custom_metrics: Optional[bool] = None):
        if self.fused_loss:
            inner = self._fused_model_of(model, sample)
            if inner is not None:
                return self._fused_forward(model, inner, sample, compute_custom_metrics)
        net_output = model(**sample["net_input"])
        target = model.get_targets(sample, net_output)
        scores = model_scores(model, net_output)
        loss = scalegrad_loss(
            scores, target, self.gamma, ignore_index=self.padding_idx, eps=self.eps,
            reduction="sum",
        )
        with torch.no_grad():
            nll_loss = self.nll(scores, target)
        sample_size, logging_output = self._counts(sample, loss, nll_loss)
        logging_output.update(
            token_metrics_logging(
                scores, target, self.padding_idx,
                compute=self.metrics_schedule(model, compute_custom_metrics),
            )
        )
        return loss, sample_size, logging_output

    def _fused_forward(self, model, inner, sample, compute_custom_metrics):
        """``forward`` with ``--fused-loss``: the loss from the hidden states, ``nll_loss``
        and the token metrics from the same chunks of logits (one pass)."""

        # Through the model's (wrapper's) forward, so DDP sees the pass.
        hidden, _ = model(**sample["net_input"], features_only=True)
        target = sample["target"]
        # Under torch.no_grad() (validation) fused_linear_scalegrad_loss skips its
        # gradient work itself.
        weight, bias = _output_projection(inner)
        # One pass: nll and ranks come from the logits the loss is computed from.
        loss, stats = fused_linear_scalegrad_loss(
            hidden, weight, target, self.gamma, bias=bias, ignore_index=self.padding_idx,
            eps=self.eps, chunk_size=self.fused_chunk_size, statistics=True,
        )
        compute = self.metrics_schedule(model, compute_custom_metrics)
        valid = target != self.padding_idx
        keep = valid.reshape(-1)
        nll_loss = stats["nll"].masked_fill(~keep, 0.0).sum()
        sample_size, logging_output = self._counts(sample, loss, nll_loss)
        # As token_metrics_logging: the batch as one flat sequence, padding left out.
        metrics_output = {key: 0.0 for key in TOKEN_METRIC_KEYS}
        if compute and bool(keep.any()):
            metrics_output.update(ranking_metrics_from_ranks(
                stats["higher"][keep], stats["predictions"][keep], target.reshape(-1)[keep]))
            metrics_output[MEDIAN_COUNT] = 1.0
        logging_output.update(metrics_output)
        return loss, sample_size, logging_output

    def _counts(self, sample, loss, nll_loss):
        """``(sample_size, logging_output)`` with the loss, the NLL and the batch's counts."""
        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        return sample_size, {
            "loss": loss.data,
            "nll_loss": nll_loss,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }

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
