"""The training loop of the original driver (``docs/reference.md``, section 5), resumable.

One chunk of ``--train-batch-size + 1`` tokens per step (per process under
torchrun; ``--gradient-accumulation-steps`` chunks per update when given), drawn in
a random order that is drawn again every epoch. Each step:

1. one forward call of the (DDP-wrapped) :class:`~scalegrad.gpt2.objectives.StepModel`:
   the ScaleGrad loss of the chunk (``--fused-loss``: from the final hidden states; with
   ``--objective contrastive_token`` or ``simctg`` that objective, ``docs/objectives.md``),
   or, with probability ``--sequence-tune-rate``, the sequence-level unlikelihood loss
   of continuations of its prefixes (section 7);
2. backward (DDP averages the gradients over the processes), optimizer and schedule
   step; a step whose loss is not finite on some process is skipped everywhere;
3. every ``--report-metrics-every`` steps of the epoch: the aggregated training metrics;
4. at step index ``--train-n-steps`` of the epoch: the epoch ends (the original's
   quirk; ``--exact-train-n-steps`` stops after that many updates in all);
5. every ``--validate-every`` steps in all: single-token evaluation on
   ``--eval-split``; a new best perplexity is saved in ``best/``;
6. every ``--save-every`` steps of the epoch: the model in ``--output-dir`` and a
   resumable checkpoint in ``--output-dir/resume``.

The training report and every validation's metrics also go to :meth:`Trainer.log_scalars`,
the one place where other writers (TensorBoard, W&B) hook in. SIGINT or SIGTERM end
the run after the current step with a checkpoint (:mod:`.stop`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..data import load_chunks
from ..errors import UserError
from . import checkpoint
from .evaluate import eval_singletoken, model_config_dict, singletoken_filename, write_singletoken_result
from .objectives import StepModel, check_fused_model, objective_description, token_step_kind, training_report
from .optim import build_optimizer, build_schedule
from .plan import Plan, Progress, make_plan
from .runtime import Runtime, check_positions, make_output_dir
from .stop import StopRequest

__all__ = ["Trainer", "TrainResult", "train", "Plan", "make_plan", "training_report"]

logger = logging.getLogger(__name__)

#: ``(step, prefix, scalars)``: a writer of the training report (prefix ``train``)
#: and of the validation metrics (prefix ``valid``), called on rank 0.
ScalarSink = Callable[[int, str, dict], None]


@dataclass
class TrainResult:
    status: str                    # "finished", "interrupted", "already-finished"
    total_steps: int
    best_ppl: float
    last_report: dict | None = None


def _args_snapshot(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items())
            if v is None or isinstance(v, (bool, int, float, str))}


# Flags whose change on --resume changes the training trajectory.
_TRAJECTORY_FLAGS = ("seed", "gamma", "learning_rate", "adam_epsilon", "weight_decay",
                     "warmup_steps", "max_steps", "num_train_epochs", "train_batch_size",
                     "train_n_steps", "gradient_accumulation_steps", "max_grad_norm",
                     "sequence_tune_rate", "sequence_ngram_n", "rank_alpha", "prefix_length",
                     "continuation_length", "top_k", "top_p", "enable_dropout",
                     "exact_train_n_steps", "adamw", "fp16", "bf16", "objective", "ct_length",
                     "ct_preced_m_negatives", "simctg_margin")


class Trainer:
    """Runs ``--mode train``; ``on_step`` (tests) is called after every step with the trainer."""

    def __init__(self, args, runtime: Runtime, model, tokenizer, *,
                 resume_state: dict | None = None,
                 on_step: Callable[["Trainer"], None] | None = None):
        self.args = args
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.on_step = on_step
        self.output_dir = args.output_dir
        device = runtime.device
        vocab_size = model.config.vocab_size

        self.train_chunks = load_chunks(args.data_base, "train", args.train_batch_size, vocab_size)
        self.plan = make_plan(args, self.train_chunks.size(0), runtime.world_size)
        check_positions(model, "--train-batch-size", args.train_batch_size)
        if args.sequence_tune_rate > 0:
            check_positions(model, "--prefix-length + --continuation-length",
                             args.prefix_length + args.continuation_length)
        # Only what this run uses is checked (no validation: no --eval-split, no
        # --batch-size-singletoken).
        self.eval_chunks = None
        if self.plan.validates(args):
            if args.eval_split is None:
                raise UserError(f"training validates every {args.validate_every} steps on "
                                f"--eval-split, which is not given; pass --eval-split valid (or "
                                f"a --validate-every longer than the run)")
            check_positions(model, "--batch-size-singletoken", args.batch_size_singletoken)
            self.eval_chunks = load_chunks(args.data_base, args.eval_split,
                                           args.batch_size_singletoken, vocab_size)

        self.model = model.to(device)
        if args.fused_loss:
            check_fused_model(self.model, self.train_chunks[0][:16].unsqueeze(0).to(device),
                              args.model_load_dir or args.model_name)
        self.model.train(args.enable_dropout)
        # Every step is one forward call of this module; under torchrun DDP wraps it,
        # so its bucketed all-reduce averages the gradients of every kind of step.
        self.step_model = StepModel(self.model, args, runtime)
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.step_model = DistributedDataParallel(
                self.step_model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        self.optimizer = build_optimizer(self.model, learning_rate=args.learning_rate,
                                         adam_epsilon=args.adam_epsilon,
                                         weight_decay=args.weight_decay, kind=args.adamw)
        self.scheduler = build_schedule(self.optimizer, warmup_steps=args.warmup_steps,
                                        total_steps=self.plan.total_schedule_steps)
        # Loss scaling for --fp16; disabled (scale 1, plain steps) otherwise: one code path.
        self.scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)
        # The chunk order and the choice of sequence-level steps come from their own
        # generators, the same on every process.
        self.order_rng = torch.Generator().manual_seed(args.seed)
        self.decision_rng = torch.Generator().manual_seed(args.seed + 1)
        self.order: torch.Tensor | None = None
        self.progress = Progress()
        self.stop = StopRequest()
        self.last_report: dict | None = None
        self.scalar_sinks: list[ScalarSink] = []
        self._saved: tuple | None = None
        if resume_state is not None:
            self._restore(resume_state)

    # ---- checkpoints ----

    def _state(self) -> dict:
        rng_states = self.runtime.gather_objects(checkpoint.capture_rng_state())
        return {
            "format": checkpoint.STATE_FORMAT,
            "world_size": self.runtime.world_size,
            "num_chunks": self.plan.num_chunks,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # {} when disabled
            "rng": rng_states,
            "order_rng": self.order_rng.get_state(),
            "decision_rng": self.decision_rng.get_state(),
            "order": self.order,
            "progress": self.progress.as_dict(),
            "args": _args_snapshot(self.args),
            # Where the run's model first came from (the result files' config says so).
            "model_name_or_path": getattr(self.model.config, "_name_or_path", ""),
        }

    def _restore(self, state: dict) -> None:
        if state["world_size"] != self.runtime.world_size:
            raise UserError(f"the checkpoint in {checkpoint.resume_dir(self.output_dir)} was made "
                            f"with {state['world_size']} process(es); resume with the same number "
                            f"(here: {self.runtime.world_size})")
        if state["num_chunks"] != self.plan.num_chunks:
            raise UserError(f"the train split now has {self.plan.num_chunks} chunks, the checkpoint "
                            f"was made with {state['num_chunks']}: the data or "
                            f"--train-batch-size changed since")
        saved_args = state.get("args", {})
        changed = [f"--{k.replace('_', '-')}" for k in _TRAJECTORY_FLAGS
                   if k in saved_args and saved_args[k] != getattr(self.args, k, None)]
        if changed and self.runtime.is_main:
            logger.warning("resuming with other values of %s than the checkpoint was made with; "
                           "the run will not match an uninterrupted one", ", ".join(changed))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.order_rng.set_state(state["order_rng"])
        self.decision_rng.set_state(state["decision_rng"])
        self.order = state["order"]
        self.progress = Progress(**state["progress"])
        if state.get("model_name_or_path"):
            self.model.config._name_or_path = state["model_name_or_path"]
        checkpoint.restore_rng_state(state["rng"][self.runtime.rank])
        if self.runtime.is_main:
            logger.info("resumed from %s at epoch %d, step %d (%d steps done)",
                        checkpoint.resume_dir(self.output_dir), self.progress.epoch,
                        self.progress.step, self.progress.total_steps)

    def save_checkpoint(self, *, publish: bool) -> None:
        key = (self.progress.total_steps, self.progress.finished)
        if self._saved == key and not publish:
            return  # this very state is on disk already
        self._saved = key
        state = self._state()  # a collective under torchrun: every rank gets here
        if self.runtime.is_main:
            path = checkpoint.save_resume_checkpoint(self.output_dir, self.model, self.tokenizer,
                                                     state, publish=publish)
            logger.info("checkpoint written to %s%s", path,
                        f" and {self.output_dir}" if publish else "")
        self.runtime.barrier()

    # ---- one step ----

    def _objective(self) -> str:
        """The kind of the next chunk's step; the same draw on every process."""
        args = self.args
        if args.sequence_tune_rate > 0 and (
                torch.rand(1, generator=self.decision_rng).item() < args.sequence_tune_rate):
            return "sequence"
        return token_step_kind(args)

    def train_step(self, chunk_indices: list[int]) -> tuple[bool, list[dict], float]:
        """One update over ``chunk_indices`` (one chunk per accumulation step).

        Returns ``(updated, logging_outputs, loss)``; ``updated`` is False when a
        loss was not finite on some process (then nothing changes).
        """
        runtime, scaler = self.runtime, self.scaler
        self.optimizer.zero_grad(set_to_none=True)
        logs, loss_total = [], 0.0
        for micro, index in enumerate(chunk_indices):
            chunk = self.train_chunks[index].to(runtime.device)
            # DDP averages the gradients in the backward of the last chunk only.
            last = micro == len(chunk_indices) - 1
            accumulate = runtime.distributed and not last
            with self.step_model.no_sync() if accumulate else contextlib.nullcontext():
                loss, log = self.step_model(chunk, self._objective())
                if runtime.any_rank(not torch.isfinite(loss).item()):
                    self.optimizer.zero_grad(set_to_none=True)
                    return False, [], float("nan")
                scaler.scale(loss / len(chunk_indices)).backward()
            logs.append(log)
            loss_total += loss.item()
        if self.args.max_grad_norm is not None:
            scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        scaler.step(self.optimizer)
        scaler.update()
        self.scheduler.step()
        return True, logs, loss_total / len(chunk_indices)

    # ---- reporting, validation ----

    def log_scalars(self, step: int, prefix: str, scalars: dict) -> None:
        """Hand the training report (``prefix="train"``) or a validation's metrics
        (``"valid"``) to every writer in :attr:`scalar_sinks` (rank 0 only)."""
        for sink in self.scalar_sinks:
            sink(step, prefix, scalars)

    def report(self) -> None:
        progress = self.progress
        gathered = self.runtime.gather_objects((progress.logging_outputs, progress.nonfinite_steps))
        logs = [log for rank_logs, _ in gathered for log in rank_logs]
        skipped = max(count for _, count in gathered)
        if self.runtime.is_main:
            report = training_report(logs)
            if skipped:
                report["nonfinite_skipped"] = skipped
            self.last_report = report
            logger.info("step %d: %s", progress.total_steps, report)
            self.log_scalars(progress.total_steps, "train", report)
        progress.logging_outputs = []
        progress.nonfinite_steps = 0

    def validate(self) -> None:
        args, runtime, progress = self.args, self.runtime, self.progress
        if runtime.is_main:
            logger.info("validating on %s after %d steps", args.eval_split, progress.total_steps)
        metrics = eval_singletoken(self.model, self.eval_chunks, runtime, desc="Validating")
        if runtime.is_main:
            self.log_scalars(progress.total_steps, "valid", metrics)
            config = model_config_dict(self.model)
            # Which objective (and parameters) trained the model: in every result file.
            objective = objective_description(args)
            write_singletoken_result(self.output_dir, args, metrics, config, step=progress.total_steps,
                                     objective=objective)
            if metrics["ppl"] < progress.best_ppl:
                checkpoint.save_best(self.output_dir, self.model, self.tokenizer,
                                     singletoken_filename(args, progress.total_steps),
                                     {"metrics": metrics, "config": config, "objective": objective})
        if metrics["ppl"] < progress.best_ppl:
            progress.best_ppl = metrics["ppl"]
        runtime.barrier()

    # ---- the loop ----

    def _epoch_chunks(self) -> torch.Tensor:
        """This process's chunk indices for the current epoch, in order."""
        if self.order is None:
            self.order = torch.randperm(self.plan.num_chunks, generator=self.order_rng)
        runtime = self.runtime
        return self.order[runtime.rank::runtime.world_size][: self.plan.chunks_per_rank]

    def _end_epoch(self) -> None:
        progress = self.progress
        progress.epoch += 1
        progress.step = 0
        progress.epoch_loss = 0.0
        progress.logging_outputs = []  # the original drops what was not reported yet
        self.order = None

    def _done(self) -> bool:
        progress, args = self.progress, self.args
        if args.exact_train_n_steps and progress.total_steps >= args.train_n_steps:
            return True
        return progress.epoch >= self.plan.num_epochs

    def run(self) -> TrainResult:
        args, runtime, progress, plan = self.args, self.runtime, self.progress, self.plan
        if progress.finished:
            if runtime.is_main:
                logger.info("the checkpoint in %s is of a finished run; nothing to do",
                            checkpoint.resume_dir(self.output_dir))
            return TrainResult("already-finished", progress.total_steps, progress.best_ppl)
        if runtime.is_main:
            make_output_dir(self.output_dir)  # best/ comes with the first best model
            logger.info("training: %d chunks of %d + 1 tokens, %d update(s) per epoch per process, "
                        "%d epoch(s), schedule over %d steps, %d process(es)", plan.num_chunks,
                        args.train_batch_size, plan.updates_per_epoch, plan.num_epochs,
                        plan.total_schedule_steps, runtime.world_size)
            logger.info("objective: %s", objective_description(args))
        runtime.barrier()
        bar = None
        status = "finished"
        with self.stop:
            while status != "interrupted" and not self._done():
                epoch = progress.epoch
                chunks = self._epoch_chunks()
                steps = plan.steps_in_epoch(args)
                if runtime.show_progress:
                    from tqdm.auto import tqdm
                    bar = tqdm(total=steps, initial=progress.step, desc="Training", unit="step")
                try:
                    while progress.epoch == epoch and not self._done():
                        if self._one_step(chunks, steps, bar):
                            status = "interrupted"
                            break
                finally:
                    if bar is not None:
                        bar.close()
                        bar = None
        if status == "interrupted":
            # Every rank says where it stopped (the same step on all of them).
            logger.warning("rank %d stopped (%s) after %d steps; the checkpoint is in %s",
                           runtime.rank, self.stop.signal_name or "another rank's stop request",
                           progress.total_steps, checkpoint.resume_dir(self.output_dir))
            return TrainResult("interrupted", progress.total_steps, progress.best_ppl, self.last_report)
        progress.finished = True
        self.save_checkpoint(publish=True)
        return TrainResult("finished", progress.total_steps, progress.best_ppl, self.last_report)

    def _one_step(self, chunks: torch.Tensor, steps: int, bar) -> bool:
        """Run the step ``progress.step``; True when the run must stop now (checkpoint written)."""
        args, runtime, progress, plan = self.args, self.runtime, self.progress, self.plan
        step = progress.step
        indices = chunks[step * plan.accumulation:(step + 1) * plan.accumulation].tolist()
        updated, logs, loss = self.train_step(indices)
        progress.total_steps += 1
        epoch_steps = step + 1
        if updated:
            progress.consecutive_nonfinite = 0
            progress.epoch_loss += loss
            progress.logging_outputs.extend(logs)
        else:
            progress.consecutive_nonfinite += 1
            progress.nonfinite_steps += 1
            progress.nonfinite_total += 1
            if runtime.is_main:
                logger.warning("step %d: non-finite loss, step skipped (%d in a row, %d in all)",
                               progress.total_steps, progress.consecutive_nonfinite,
                               progress.nonfinite_total)
        if bar is not None:
            bar.update(1)
            bar.set_description("Training loss: {:.2e} lr: {:.2e}".format(
                progress.epoch_loss / epoch_steps, self.scheduler.get_last_lr()[0]))

        if epoch_steps % args.report_metrics_every == 0:
            self.report()
        epoch_over = epoch_steps >= steps
        if not args.exact_train_n_steps and step == args.train_n_steps:
            # The original breaks here, before saving and validating.
            self._end_epoch()
        else:
            if progress.total_steps % args.validate_every == 0:
                self.validate()
            save_due = epoch_steps % args.save_every == 0
            progress.step += 1
            if epoch_over:
                self._end_epoch()
            if save_due:
                self.save_checkpoint(publish=True)
        if progress.consecutive_nonfinite >= args.max_nonfinite_steps:
            self.save_checkpoint(publish=False)
            raise UserError(
                f"{progress.consecutive_nonfinite} steps in a row had a non-finite loss (up to "
                f"step {progress.total_steps}); stopped. {checkpoint.resume_dir(self.output_dir)} "
                f"holds the weights from before them; lower --learning-rate, or drop "
                f"--fp16, and resume with --resume")
        if self.on_step is not None:
            self.on_step(self)
        if runtime.any_rank(self.stop.signal_name is not None):
            self.save_checkpoint(publish=False)
            return True
        return False


def train(args, runtime: Runtime, model, tokenizer, *, resume_state=None, on_step=None) -> TrainResult:
    return Trainer(args, runtime, model, tokenizer, resume_state=resume_state,
                   on_step=on_step).run()
