"""``language_modeling_with_generation``: fairseq's language modeling task
with the unlikelihood module's training step.

With probability ``--sequence-level-train-rate`` a training step uses the
sequence-level criterion (``sequence_penalty``, configured by the
``--sequence-*`` options and ``--mask-p``) instead of the main one; on the
other steps the main criterion runs, computing the token-level metrics on
every ``--compute-metrics-interval``-th such step (the criteria of this
package; others run as they are).

Differences from the original, none of which changes a loss:

* the draw is made from ``(seed, update, micro-batch)``, not from the global
  random state, so all workers of a distributed run take the same kind of
  step and a resumed run repeats the draws;
* every training logging output holds the keys of both criteria (zeros for
  the one that did not run), so fairseq can sum them across micro-batches
  and workers;
* a batch shorter than one prefix plus one continuation still gets one
  prefix (the original ran an empty sequence-level step then).

``--rank-alpha`` and ``--candidate-type`` (``prev_context``, its only choice)
are accepted here too, as the original task declared them, so the original's
command lines parse whatever the criterion. With this task the task's
``--compute-metrics-interval`` decides for this package's criteria: they are
called with the original's keyword ``compute_custom_metrics`` (on the command
line the task's and the criteria's options are one flag, with the task's default
250; in a hydra config set
``criterion.compute_metrics_interval: ${task.compute_metrics_interval}``).
"""

import random
from dataclasses import dataclass, field

import torch
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from ..criterions.candidate_penalty_cross_entropy import CANDIDATE_TYPES, candidate_type_field
from ..criterions.sequence_penalty import (
    SEQUENCE_LOGGING_KEYS,
    SequenceOptions,
    SequencePenaltyCriterion,
)
from ..criterions.token_metrics import check_interval

BASIC_KEYS = ["loss", "ntokens", "nsentences", "sample_size"]


@dataclass
class LanguageModelingWithGenerationConfig(LanguageModelingConfig, SequenceOptions):
    compute_metrics_interval: int = field(
        default=250,
        metadata={
            "help": "compute the token-level ranking metrics on every N-th training "
            "step of the main criterion (always in validation; 0: only in validation)"
        },
    )
    sequence_level_train_rate: float = field(
        default=0.0,
        metadata={"help": "probability that a training step uses the sequence-level criterion"},
    )
    candidate_type: CANDIDATE_TYPES = candidate_type_field()
    rank_alpha: float = field(
        default=1.0,
        metadata={
            "help": "weight of the token-level candidate penalty, read by "
            "candidate_penalty_cross_entropy (also accepted here, as the original "
            "task did, so its command lines work with any criterion)"
        },
    )


@register_task("language_modeling_with_generation", dataclass=LanguageModelingWithGenerationConfig)
class LanguageModelingWithGenerationTask(LanguageModelingTask):
    """Language modeling with sequence-level unlikelihood steps mixed in."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary=output_dictionary, targets=targets)
        self.compute_metrics_interval = check_interval(args.compute_metrics_interval)
        rate = float(args.sequence_level_train_rate)
        if not (0.0 <= rate <= 1.0):
            raise ValueError(f"--sequence-level-train-rate must be between 0 and 1, got {rate}")
        self.sequence_level_train_rate = rate
        self.sequence_criterion = None
        if rate > 0.0:
            self.sequence_criterion = SequencePenaltyCriterion(
                self,
                sequence_ngram_n=args.sequence_ngram_n,
                sequence_prefix_length=args.sequence_prefix_length,
                sequence_completion_length=args.sequence_completion_length,
                sequence_candidate_type=args.sequence_candidate_type,
                mask_p=args.mask_p,
                sequence_check_last_ngram=args.sequence_check_last_ngram,
            )
        self._seed = int(getattr(args, "seed", 1) or 1)
        self._main_steps = 0            # training steps of the main criterion
        self._micro_batch = (None, 0)   # (update, index of the micro-batch in it)
        self._main_keys = list(BASIC_KEYS)

    # -- training step -------------------------------------------------------

    def _sequence_step_drawn(self, update_num) -> bool:
        last_update, index = self._micro_batch
        index = index + 1 if last_update == update_num else 0
        self._micro_batch = (update_num, index)
        draw = random.Random(f"{self._seed}:{update_num}:{index}").random()
        return draw < self.sequence_level_train_rate

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        model.train()
        model.set_num_updates(update_num)
        sequence_step = (
            self.sequence_criterion is not None
            and self._sequence_step_drawn(update_num)
            and self.sequence_criterion.can_cut_prefixes(sample)
        )
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                if sequence_step:
                    loss, sample_size, output = self.sequence_criterion(model, sample)
                else:
                    self._main_steps += 1
                    loss, sample_size, output = self._main_forward(model, sample, criterion)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        if self.sequence_criterion is not None:
            output = self._full_logging_output(output, criterion, sequence_step)
        return loss, sample_size, output

    def _main_forward(self, model, sample, criterion):
        if hasattr(criterion, "metrics_schedule"):  # this package's criteria
            interval = self.compute_metrics_interval
            compute = interval > 0 and self._main_steps % interval == 0
            return criterion(model, sample, compute_custom_metrics=compute)
        return criterion(model, sample)

    def _full_logging_output(self, output, criterion, sequence_step):
        """The same keys, in the same order, whichever criterion ran."""
        if hasattr(criterion, "logging_keys"):
            main_keys = list(criterion.logging_keys())
        else:
            if not sequence_step:
                self._main_keys += [k for k in output if k not in self._main_keys
                                    and k not in SEQUENCE_LOGGING_KEYS]
            main_keys = self._main_keys
        full = {}
        for key in main_keys:
            full[key] = 0 if sequence_step else output.get(key, 0)
        for key in SEQUENCE_LOGGING_KEYS:
            full[key] = output.get(key, 0) if sequence_step else 0
        if not sequence_step:
            full.update((k, v) for k, v in output.items() if k not in full)
        return full

    # -- logging ---------------------------------------------------------------

    def reduce_metrics(self, logging_outputs, criterion):
        if self.sequence_criterion is None:
            return super().reduce_metrics(logging_outputs, criterion)
        main_outputs = [log for log in logging_outputs if log.get("sample_size", 0) > 0]
        if main_outputs:  # an update of sequence-level steps only has none
            super().reduce_metrics(main_outputs, criterion)
        SequencePenaltyCriterion.reduce_sequence_metrics(logging_outputs)
