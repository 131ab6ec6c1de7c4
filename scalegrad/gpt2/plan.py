"""How long a training run is (``docs/reference.md``, section 5): chunks per process,
updates per epoch, epochs, the schedule's length; and where a run is (:class:`Progress`,
saved in every checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError
from .options import accumulation_steps

__all__ = ["Plan", "make_plan", "Progress", "NO_BEST_PPL"]

#: ``best_ppl`` before any validation (the original's start value).
NO_BEST_PPL = 1e20


@dataclass
class Plan:
    num_chunks: int            # training chunks in the split
    chunks_per_rank: int       # per process and epoch (the remainder is dropped)
    accumulation: int          # chunks per update
    updates_per_epoch: int
    num_epochs: int
    total_schedule_steps: int  # t_total of the linear schedule

    def steps_in_epoch(self, args) -> int:
        if args.exact_train_n_steps:
            return self.updates_per_epoch
        return min(self.updates_per_epoch, args.train_n_steps + 1)

    def planned_updates(self, args) -> int:
        if args.exact_train_n_steps:
            return min(args.train_n_steps, self.updates_per_epoch * self.num_epochs)
        return self.steps_in_epoch(args) * self.num_epochs


    def validates(self, args) -> bool:
        """Whether some step of the run validates (every ``--validate-every`` steps in
        all, except the step that ends an epoch at ``--train-n-steps``, the quirk)."""
        every = args.validate_every
        if every < 1:
            return False
        if args.exact_train_n_steps:
            return self.planned_updates(args) >= every
        steps = self.steps_in_epoch(args)
        validating = steps - 1 if steps == args.train_n_steps + 1 else steps
        for epoch in range(self.num_epochs):
            first = (epoch * steps // every + 1) * every  # the first multiple after the epoch's start
            if first <= epoch * steps + validating:
                return True
        return False


def make_plan(args, num_chunks: int, world_size: int) -> Plan:
    accumulation = accumulation_steps(args)
    chunks_per_rank = num_chunks // world_size
    updates_per_epoch = chunks_per_rank // accumulation
    if updates_per_epoch < 1:
        raise UserError(
            f"the train split has {num_chunks} chunks of {args.train_batch_size} + 1 tokens: too "
            f"few for one update of {accumulation} chunk(s) on each of {world_size} process(es); "
            f"use a smaller --train-batch-size or more data")
    if args.max_steps > 0:
        total = args.max_steps
        num_epochs = args.max_steps // updates_per_epoch + 1
    else:
        total = updates_per_epoch * args.num_train_epochs
        num_epochs = args.num_train_epochs
    return Plan(num_chunks, chunks_per_rank, accumulation, updates_per_epoch, num_epochs, total)


@dataclass
class Progress:
    """Where the loop is; saved in the checkpoint."""
    epoch: int = 0
    step: int = 0                  # next step index within the epoch
    total_steps: int = 0
    epoch_loss: float = 0.0
    best_ppl: float = NO_BEST_PPL
    logging_outputs: list = field(default_factory=list)
    consecutive_nonfinite: int = 0
    nonfinite_steps: int = 0       # skipped since the last report
    nonfinite_total: int = 0
    finished: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)
