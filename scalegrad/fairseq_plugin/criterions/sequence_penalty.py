"""``sequence_penalty``: sequence-level unlikelihood training (Welleck et al.,
2019) as a fairseq criterion for language models.

The batch is cut into prefixes, each prefix is continued greedily, and the
generated tokens that repeat an N-gram generated earlier in the same
continuation (or, with ``--sequence-candidate-type random``, a random
``--mask-p`` share of them) get ``-log(clamp(1 - p(token), min=1e-20))``.

Behaviour of the original, kept:

* as many prefixes as ``src_len // (prefix + completion)`` (so the step costs
  about as many tokens as the batch's sequence length), taken from the start
  of the batch; the original took none when the batch is shorter than that,
  here at least one is taken;
* the whole step runs with the model in evaluation mode (no dropout): the
  original's generator switched it and nothing switched it back before the
  loss;
* the last N-gram of a continuation is never checked (``--sequence-check-last-ngram``
  checks it).

The original continued the prefixes with gradients kept through the
incremental decoder. Here the continuation is generated without gradients and
the model is then run once, with gradients, over prefix + continuation: the
same log-probabilities (dropout is off either way) and the same gradients, in
one forward pass that fairseq's distributed wrapper sees.
"""

import math
from dataclasses import dataclass, field

import torch
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.logging import metrics
from fairseq.models import FairseqIncrementalDecoder

from ...errors import UserError
from ...metrics import ngram_metric_sums
from ...unlikelihood import ngram_repeat_mask, sequence_penalty_loss

SEQUENCE_CANDIDATE_TYPES = ChoiceEnum(["repeat", "random"])
NGRAM_ORDERS = (1, 2, 3, 4)
SEQUENCE_LOGGING_KEYS = [
    "seq_loss",
    "seq_ntokens",
    "seq_nsentences",
    "seq_repeat_mask",
    "seq_sample_size",
] + [f"seq_pct_repeat_{n}grams" for n in NGRAM_ORDERS]


@dataclass
class SequenceOptions(FairseqDataclass):
    """The sequence-level options, shared by this criterion's config and the
    language_modeling_with_generation task's (fairseq gives both the same flags)."""

    sequence_ngram_n: int = field(
        default=1, metadata={"help": "penalise repeats of N-grams of this length"}
    )
    sequence_prefix_length: int = field(
        default=16, metadata={"help": "length of the prefixes cut from the batch"}
    )
    sequence_completion_length: int = field(
        default=48, metadata={"help": "number of tokens generated after each prefix"}
    )
    sequence_candidate_type: SEQUENCE_CANDIDATE_TYPES = field(
        default="repeat",
        metadata={"help": "penalise repeated N-grams, or a random --mask-p share of the tokens"},
    )
    mask_p: float = field(
        default=0.5, metadata={"help": "share of penalised tokens for the 'random' candidate type"}
    )
    sequence_check_last_ngram: bool = field(
        default=False,
        metadata={"help": "also check the last N-gram of each continuation (the original never does)"},
    )


@dataclass
class SequencePenaltyConfig(SequenceOptions):
    pass


def check_sequence_options(ngram_n, prefix_length, completion_length, candidate_type, mask_p):
    """Raise ``ValueError`` naming the option when one is out of range."""
    if ngram_n < 1:
        raise ValueError(f"--sequence-ngram-n must be >= 1, got {ngram_n}")
    if prefix_length < 1:
        raise ValueError(f"--sequence-prefix-length must be >= 1, got {prefix_length}")
    if completion_length < 1:
        raise ValueError(f"--sequence-completion-length must be >= 1, got {completion_length}")
    if str(candidate_type) not in ("repeat", "random"):
        raise ValueError(f"--sequence-candidate-type must be 'repeat' or 'random', got {candidate_type!r}")
    if not (0.0 <= mask_p <= 1.0):
        raise ValueError(f"--mask-p must be between 0 and 1, got {mask_p}")


def cut_prefixes(src_tokens: torch.Tensor, prefix_length: int, completion_length: int) -> torch.Tensor:
    """The prefixes of one sequence-level step: the batch cut row by row into
    consecutive windows of ``prefix_length`` (remainders dropped), the first
    ``max(1, src_len // (prefix_length + completion_length))`` of them. A batch
    shorter than one prefix (a short last block, when this is the main
    criterion) gives its first row as the one, shorter, prefix."""
    src_len = src_tokens.size(1)
    prefix_length = min(prefix_length, src_len)
    kept = src_len // prefix_length * prefix_length
    windows = src_tokens[:, :kept].reshape(-1, prefix_length)
    count = max(1, src_len // (prefix_length + completion_length))
    return windows[:count]


@torch.no_grad()
def greedy_continuation(model, prefixes: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, length)`` greedy continuation of ``prefixes`` ``(B, P)`` by a
    fairseq language model, with its incremental (cached) decoding when the
    decoder has one. Padding is not excluded, as in the original."""
    decoder = getattr(model, "decoder", None)
    incremental = isinstance(decoder, FairseqIncrementalDecoder)
    state = {} if incremental else None
    tokens = prefixes
    if incremental:
        for step in range(1, prefixes.size(1)):
            model(tokens[:, :step], incremental_state=state)
    generated = []
    for _ in range(length):
        if incremental:
            net_output = model(tokens, incremental_state=state)
        else:
            net_output = model(tokens)
        last = (net_output[0][:, -1:], *net_output[1:])
        lprobs = model.get_normalized_probs(last, log_probs=True)[:, -1]
        next_token = lprobs.argmax(dim=-1, keepdim=True)
        generated.append(next_token)
        tokens = torch.cat((tokens, next_token), dim=1)
    return torch.cat(generated, dim=1)


@register_criterion("sequence_penalty", dataclass=SequencePenaltyConfig)
class SequencePenaltyCriterion(FairseqCriterion):
    """Sequence-level unlikelihood on greedy continuations of the batch's prefixes.

    Logs ``seq_loss`` (bits per generated token), ``seq_ntokens``,
    ``seq_nsentences`` and ``seq_sample_size`` (generated tokens, continuations
    and the sample size, per update), ``seq_nll_loss`` when the sample size is
    not the token count (as the original's aggregate; here they are always
    equal), ``seq_repeat_mask`` (share of penalised tokens),
    ``seq_pct_repeat_{N}grams`` (mean over continuations) and, when it is the
    main criterion, ``loss`` (= ``seq_loss``).
    """

    def __init__(self, task, sequence_ngram_n=1, sequence_prefix_length=16,
                 sequence_completion_length=48, sequence_candidate_type="repeat", mask_p=0.5,
                 sequence_check_last_ngram=False):
        super().__init__(task)
        check_sequence_options(sequence_ngram_n, sequence_prefix_length,
                               sequence_completion_length, sequence_candidate_type, mask_p)
        self.ngram_n = int(sequence_ngram_n)
        self.prefix_length = int(sequence_prefix_length)
        self.completion_length = int(sequence_completion_length)
        self.candidate_type = str(sequence_candidate_type)
        self.mask_p = float(mask_p)
        self.check_last_ngram = bool(sequence_check_last_ngram)

    def can_cut_prefixes(self, sample) -> bool:
        """Whether the batch holds one prefix (the original's test before a
        sequence-level step)."""
        return sample["net_input"]["src_tokens"].size(1) >= self.prefix_length

    def forward(self, model, sample, reduce=True):
        prefixes = cut_prefixes(sample["net_input"]["src_tokens"], self.prefix_length,
                                self.completion_length)
        self._check_positions(model)
        was_training = model.training
        model.eval()
        try:
            continuation = greedy_continuation(model, prefixes, self.completion_length)
            tokens = torch.cat((prefixes, continuation), dim=1)
            net_output = model(tokens[:, :-1])
            scored = (net_output[0][:, prefixes.size(1) - 1:], *net_output[1:])
            lprobs = model.get_normalized_probs(scored, log_probs=True)
        finally:
            model.train(was_training)

        if self.candidate_type == "repeat":
            mask = ngram_repeat_mask(continuation, self.ngram_n, check_last=self.check_last_ngram)
        else:
            mask = torch.bernoulli(torch.full(continuation.shape, self.mask_p, device=continuation.device))
        mask = mask.to(lprobs.dtype)
        loss = sequence_penalty_loss(lprobs, continuation, mask)

        ntokens = continuation.numel()
        nsentences = continuation.size(0)
        logging_output = {
            "seq_loss": loss.data,
            "seq_ntokens": ntokens,
            "seq_nsentences": nsentences,
            "seq_repeat_mask": mask.sum().item(),
            "seq_sample_size": ntokens,
        }
        # Sums of per-continuation values; divided by the continuation count when reduced.
        for key, value in ngram_metric_sums(continuation, pad=self.padding_idx).items():
            logging_output["seq_" + key] = value
        # As the main criterion: what fairseq's trainer and progress bar expect.
        logging_output.update(loss=loss.data, ntokens=ntokens, nsentences=nsentences,
                              sample_size=ntokens)
        return loss, ntokens, logging_output

    def _check_positions(self, model):
        needed = self.prefix_length + self.completion_length - 1
        max_positions = model.max_positions() if hasattr(model, "max_positions") else None
        if isinstance(max_positions, int) and needed > max_positions:
            raise UserError(
                f"--sequence-prefix-length + --sequence-completion-length - 1 = {needed} "
                f"tokens do not fit the model's {max_positions} positions; shorten them "
                f"or raise --tokens-per-sample"
            )

    @staticmethod
    def logging_keys():
        return ["loss", "ntokens", "nsentences", "sample_size"] + SEQUENCE_LOGGING_KEYS

    @staticmethod
    def reduce_sequence_metrics(logging_outputs) -> None:
        """Log the ``seq_*`` values (nothing when no sequence-level step ran)."""
        def total(key):
            return float(sum(log.get(key, 0) for log in logging_outputs))

        sample_size = total("seq_sample_size")
        ntokens = total("seq_ntokens")
        nsentences = total("seq_nsentences")
        if sample_size <= 0:
            return
        metrics.log_scalar("seq_loss", total("seq_loss") / sample_size / math.log(2), sample_size, round=3)
        # The counts, per update (averaged over the log interval, as fairseq's wpb and bsz).
        metrics.log_scalar("seq_ntokens", ntokens, round=1)
        metrics.log_scalar("seq_nsentences", nsentences, round=1)
        metrics.log_scalar("seq_sample_size", sample_size, round=1)
        if ntokens > 0 and sample_size != ntokens:  # never here: one sample per generated token
            metrics.log_scalar("seq_nll_loss", total("seq_loss") / ntokens / math.log(2), ntokens, round=3)
        metrics.log_scalar("seq_repeat_mask", total("seq_repeat_mask") / sample_size, sample_size, round=4)
        for n in NGRAM_ORDERS:
            key = f"seq_pct_repeat_{n}grams"
            metrics.log_scalar(key, total(key) / nsentences, nsentences, round=4)

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if sample_size > 0:
            loss_sum = sum(log.get("loss", 0) for log in logging_outputs)
            metrics.log_scalar("loss", loss_sum / sample_size / math.log(2), sample_size, round=3)
        cls.reduce_sequence_metrics(logging_outputs)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
