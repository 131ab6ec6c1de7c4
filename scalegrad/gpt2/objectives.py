"""What one training step of the GPT-2 driver computes for one chunk (``docs/reference.md``,
sections 5 and 7): the loss to back-propagate and the chunk's logging output.

- :func:`token_loss`: the ScaleGrad loss from the model's logits
  (:func:`scalegrad.losses.scalegrad_loss`);
- :func:`token_unlikelihood_loss` (``--objective candidate_penalty_cross_entropy``): token-level unlikelihood, NLL plus
  alpha times the candidate penalty (:func:`scalegrad.unlikelihood.candidate_penalty_loss`);
- :func:`fused_token_loss` (``--fused-loss``): the same loss from the last hidden
  state and the output embedding (:func:`scalegrad.fused.fused_linear_scalegrad_loss`),
  its metrics from the same chunks of logits (one pass);
- :func:`contrastive_token_step` and :func:`simctg_step` (``--objective
  contrastive_token`` / ``simctg``, ``docs/objectives.md``): cross-entropy plus the
  contrastive-token term, or plus SimCTG's margin loss on the last hidden states;
  :func:`fused_contrastive_token_step` the former with ``--fused-loss``;
- :func:`sequence_loss` (``--sequence-tune-rate``): sequence-level unlikelihood of
  continuations generated without gradients by the shared decoding loop
  (:func:`scalegrad.generation.generate_continuations`), scored in one forward pass.

:class:`StepModel` holds the Hugging Face model and runs one of them in its
``forward``, so every step is exactly one forward call of the module the trainer
wraps in DistributedDataParallel under torchrun: DDP's bucketed all-reduce
averages every step's gradients, whatever the objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..contrastive import (contrastive_token_loss, fused_linear_contrastive_token_loss,
                           simctg_contrastive_loss)
from ..data import make_prefixes
from ..errors import UserError
from ..fused import fused_linear_scalegrad_loss
from ..generation import generate_continuations
from ..hf import accepts, check_linear_head, linear_head, unwrap
from ..losses import scalegrad_loss
from ..metrics import (aggregate_ranking_metrics, aggregate_sequence_metrics, ngram_metric_sums,
                       ranking_metrics_from_ranks)
from ..unlikelihood import candidate_penalty_loss, ngram_repeat_mask, sequence_penalty_loss
from .evaluate import chunk_logging_output
from .runtime import Runtime

__all__ = ["StepModel", "token_loss", "token_unlikelihood_loss", "fused_token_loss",
           "contrastive_token_step", "fused_contrastive_token_step", "simctg_step",
           "sequence_loss", "check_fused_model", "training_report", "objective_description",
           "token_step_kind", "OBJECTIVES"]

#: The kinds of step :meth:`StepModel.forward` runs.
OBJECTIVES = ("token", "fused", "candidate_penalty_cross_entropy", "contrastive_token",
              "fused_contrastive_token", "simctg", "sequence")

#: The terms added to the cross-entropy in the logging outputs of the contrastive objectives
#: and of token-level unlikelihood (sums over the chunk's tokens).
CONTRASTIVE_TERMS = ("ct_loss", "simctg_loss", "ul_loss")


def token_step_kind(args) -> str:
    """The step kind of ``--objective`` (and ``--fused-loss``) for the token-level steps."""
    if args.objective == "scalegrad":
        return "fused" if args.fused_loss else "token"
    if args.objective == "contrastive_token" and args.fused_loss:
        return "fused_contrastive_token"
    return args.objective


def objective_description(args) -> dict:
    """Which objective and parameters train the model, as the result files record it."""
    if args.objective == "contrastive_token":
        described = {"name": "contrastive_token", "ct_length": args.ct_length,
                     "preced_m_negatives": args.ct_preced_m_negatives}
    elif args.objective == "simctg":
        described = {"name": "simctg", "margin": args.simctg_margin}
    elif args.objective == "candidate_penalty_cross_entropy":
        described = {"name": "candidate_penalty_cross_entropy", "rank_alpha": args.rank_alpha}
    else:
        described = {"name": "scalegrad", "gamma": args.gamma}
    described["sequence_tune_rate"] = args.sequence_tune_rate
    if args.sequence_tune_rate > 0:
        described["sequence_ngram_n"] = args.sequence_ngram_n
    return described


def token_loss(model, chunk: torch.Tensor, gamma: float, runtime: Runtime):
    """ScaleGrad loss of one chunk (``(n + 1,)`` ids): ``(loss / n, logging_output)``."""
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        logits = model(input_ids=inp).logits
    loss = scalegrad_loss(logits, target, gamma)  # float32 whatever the autocast dtype
    ntokens = inp.numel()
    logging_output = chunk_logging_output(logits[0].detach().float(), target[0], loss.item())
    return loss / ntokens, logging_output


def token_unlikelihood_loss(model, chunk: torch.Tensor, alpha: float, runtime: Runtime):
    """``--objective candidate_penalty_cross_entropy``: token-level unlikelihood of one chunk
    (``docs/reference.md``, section 6, the fairseq criterion of that name):
    ``(loss / n, logging_output)`` with ``loss = NLL + alpha * sum_c -log(max(1 - p(c),
    1e-5))``, the candidates ``c`` of a position being the distinct earlier targets of the
    chunk other than its own target (:func:`scalegrad.unlikelihood.candidate_penalty_loss`;
    a chunk holds no padding, so there is no padding candidate). Logged as the contrastive
    objectives are: ``nll`` and the term ``ul_loss``."""
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        logits = model(input_ids=inp).logits
    lprobs = F.log_softmax(logits[0].float(), dim=-1)
    _, penalty = candidate_penalty_loss(lprobs, target[0], padding_idx=-1, ignore_padding=True)
    return _cross_entropy_plus(logits, target, alpha * penalty / target.numel(), "ul_loss")


def fused_token_loss(model, chunk: torch.Tensor, gamma: float, runtime: Runtime, chunk_size: int):
    """:func:`token_loss` with ``--fused-loss``: the same ``(loss / n, logging_output)``,
    the loss computed from the base model's last hidden state and the output
    embedding, at most ``chunk_size`` positions' logits at a time (its gradients are
    computed in this forward pass; ``backward`` applies them).

    The ranking metrics come from the same chunks of logits as the loss
    (``statistics=True``): the head's matmul runs once per chunk. Under
    ``--fp16/--bf16`` the base model and the head's matmuls run in autocast as in
    the plain path; the loss itself is float32.
    """
    def compute(hidden, head, target):
        return fused_linear_scalegrad_loss(hidden, head.weight, target, gamma, bias=head.bias,
                                           chunk_size=chunk_size, statistics=True)

    return _fused_step(model, chunk, runtime, compute)[:2]


def fused_contrastive_token_step(model, chunk: torch.Tensor, args, runtime: Runtime):
    """:func:`contrastive_token_step` with ``--fused-loss``: ``CE + CT`` from the final
    hidden states, ``--fused-chunk-size`` positions' logits at a time
    (:func:`scalegrad.contrastive.fused_linear_contrastive_token_loss`), the metrics from
    the same chunks."""
    def compute(hidden, head, target):
        return fused_linear_contrastive_token_loss(
            hidden, head.weight, target, bias=head.bias, pad_id=None, ct_length=args.ct_length,
            preced_m_negatives=args.ct_preced_m_negatives, chunk_size=args.fused_chunk_size,
            statistics=True)

    loss, logging_output, stats = _fused_step(model, chunk, runtime, compute)
    logging_output["nll"] = stats["nll"].sum().item()
    logging_output["ct_loss"] = logging_output["loss"] - logging_output["nll"]
    return loss, logging_output


def _fused_step(model, chunk: torch.Tensor, runtime: Runtime, compute):
    """``(loss / n, logging_output, stats)`` of ``compute(hidden, head, target)``, a fused
    loss of the chunk with ``statistics=True``."""
    base, head = linear_head(model)
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        hidden = base(input_ids=inp).last_hidden_state
        loss, stats = compute(hidden, head, target)
    ntokens = inp.numel()
    # As chunk_logging_output builds it from the logits.
    logging_output = ranking_metrics_from_ranks(stats["higher"], stats["predictions"], target[0],
                                                ntokens=ntokens)
    logging_output["loss"] = loss.item()
    logging_output["normalizer"] = ntokens
    logging_output["sample_size"] = ntokens
    logging_output["ntokens"] = ntokens
    return loss / ntokens, logging_output, stats


def _cross_entropy_plus(logits, target, term, name: str):
    """``(CE mean + term, logging_output)`` of one chunk: the logging output's ``loss`` is
    the sum ``CE + term x n`` (as :func:`token_loss`'s), ``nll`` the CE sum and ``name``
    the term's share of it."""
    nll = F.cross_entropy(logits[0].float(), target[0], reduction="sum")
    ntokens = target.numel()
    loss = nll + term * ntokens
    logging_output = chunk_logging_output(logits[0].detach().float(), target[0], loss.item())
    logging_output["nll"] = nll.item()
    logging_output[name] = term.item() * ntokens
    return loss / ntokens, logging_output


def contrastive_token_step(model, chunk: torch.Tensor, args, runtime: Runtime):
    """``--objective contrastive_token``: cross-entropy plus the contrastive-token term of
    the chunk (:func:`scalegrad.contrastive.contrastive_token_loss`; a chunk has no
    padding, so no id is padding); ``(loss / n, logging_output)`` as :func:`token_loss`."""
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        logits = model(input_ids=inp).logits
    ct = contrastive_token_loss(logits, target, pad_id=None, ct_length=args.ct_length,
                                preced_m_negatives=args.ct_preced_m_negatives)
    return _cross_entropy_plus(logits, target, ct, "ct_loss")


def simctg_step(model, chunk: torch.Tensor, args, runtime: Runtime):
    """``--objective simctg``: cross-entropy plus SimCTG's margin loss on the last hidden
    states of the chunk's inputs (``output_hidden_states=True``;
    :func:`scalegrad.contrastive.simctg_contrastive_loss`)."""
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        outputs = model(input_ids=inp, output_hidden_states=True)
    contrastive = simctg_contrastive_loss(outputs.hidden_states[-1], margin=args.simctg_margin)
    return _cross_entropy_plus(outputs.logits, target, contrastive, "simctg_loss")


def sequence_loss(model, chunk: torch.Tensor, args, runtime: Runtime):
    """Sequence-level unlikelihood of one chunk (``docs/reference.md``, section 7; the
    parent script's ``ul_seq``): continue every prefix of the chunk, penalise the tokens
    of repeated N-grams; ``(loss / generated tokens, logging_output)``.

    The continuations are generated without gradients (greedy when ``--top-k 1
    --top-p 0``, else sampled with the global random state), with dropout off, by the
    decoding loop evaluation uses; prefix + continuation is then scored in one forward
    pass with gradients, in the model's own mode. With dropout off this gives the
    log-probabilities and gradients of the original's decoding with gradients, up to
    float rounding (tested).
    """
    prefixes = make_prefixes(chunk.unsqueeze(0), args.prefix_length)
    length, prefix_length = args.continuation_length, prefixes.size(1)
    with runtime.autocast():
        completions = generate_continuations(unwrap(model), prefixes, length,
                                             top_k=args.top_k, top_p=args.top_p)
    completions = completions.clone()  # a normal tensor, not an inference-mode one
    continuations = completions[:, prefix_length:]
    # Only the continuation's positions need logits (the last `length` of the input).
    extra = {"logits_to_keep": length} if accepts(model, "logits_to_keep") else {}
    with runtime.autocast():
        logits = model(input_ids=completions[:, :-1], **extra).logits[:, -length:]
    mask = ngram_repeat_mask(continuations, args.sequence_ngram_n)
    loss = sequence_penalty_loss(F.log_softmax(logits.float(), dim=-1), continuations, mask)
    ntokens = continuations.numel()
    logging_output = {
        "seq_loss": loss.item(),
        "seq_sample_size": ntokens,
        "seq_ntokens": ntokens,
        "seq_nsentences": continuations.size(0),
        "seq_repeat_mask": float(mask.sum()),
    }
    # pad=1 as the parent script (fairseq's padding id; for GPT-2 ids a quirk).
    logging_output.update(ngram_metric_sums(continuations, pad=1))
    return loss / ntokens, logging_output


def training_report(logging_outputs: list[dict]) -> dict:
    """What the original prints every ``--report-metrics-every`` steps: the token-level
    metrics of the token steps, the ``seq_*`` metrics of the sequence-level steps, ``ppl``."""
    report = aggregate_ranking_metrics(logging_outputs)
    report.update(aggregate_sequence_metrics(logging_outputs))
    report["ppl"] = 2 ** report["loss"]
    # The contrastive objectives: the cross-entropy and the term, in bits per token.
    ntokens = report["ntokens"]
    for key in ("nll", *CONTRASTIVE_TERMS):
        logs = [log[key] for log in logging_outputs if key in log]
        if logs and ntokens:
            report["nll_loss" if key == "nll" else key] = sum(logs) / ntokens / math.log(2)
    return report


def check_fused_model(model, input_ids: torch.Tensor, name: str) -> None:
    """``--fused-loss`` needs :func:`check_linear_head` to pass: else a UserError."""
    try:
        check_linear_head(model, input_ids)
    except ValueError as exc:
        raise UserError(
            f"--fused-loss needs a model whose logits are its last hidden state times the output "
            f"embedding (GPT-2-like heads, no logit scaling or soft-capping); the model {name} "
            f"({type(unwrap(model)).__name__}) does not qualify: {exc}. Drop --fused-loss"
        ) from None


class StepModel(torch.nn.Module):
    """The Hugging Face model (``self.model``) and the objectives: ``forward(chunk,
    objective)`` returns :func:`token_loss`'s ``(loss, logging_output)`` for
    ``objective`` in :data:`OBJECTIVES`. Its parameters are the model's."""

    def __init__(self, model, args, runtime: Runtime):
        super().__init__()
        self.model = model
        self.args = args
        self.runtime = runtime

    def forward(self, chunk: torch.Tensor, objective: str):
        args, runtime = self.args, self.runtime
        if objective == "token":
            return token_loss(self.model, chunk, args.gamma, runtime)
        if objective == "fused":
            return fused_token_loss(self.model, chunk, args.gamma, runtime, args.fused_chunk_size)
        if objective == "candidate_penalty_cross_entropy":
            return token_unlikelihood_loss(self.model, chunk, args.rank_alpha, runtime)
        if objective == "contrastive_token":
            return contrastive_token_step(self.model, chunk, args, runtime)
        if objective == "fused_contrastive_token":
            return fused_contrastive_token_step(self.model, chunk, args, runtime)
        if objective == "simctg":
            return simctg_step(self.model, chunk, args, runtime)
        if objective == "sequence":
            return sequence_loss(self.model, chunk, args, runtime)
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
