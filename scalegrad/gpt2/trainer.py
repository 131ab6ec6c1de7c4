"""The training loop of the original driver (``docs/reference.md``, section 5), resumable.

One chunk of ``--train-batch-size + 1`` tokens per step (per process under
torchrun; ``--gradient-accumulation-steps`` chunks per update when given), drawn in
a random order that is drawn again every epoch. Each step:

1. the ScaleGrad loss of the chunk (:func:`scalegrad.losses.scalegrad_loss`, divided by
   the number of input tokens; with ``--fused-loss``
   :func:`scalegrad.fused.fused_linear_scalegrad_loss` from the final hidden states, see
   :func:`fused_token_loss`), or, with probability ``--sequence-tune-rate``, the
   sequence-level unlikelihood loss of greedy continuations of its prefixes (section 7);
2. backward, optimizer and schedule step (a step whose loss is not finite is skipped);
3. every ``--report-metrics-every`` steps of the epoch: the aggregated training metrics;
4. at step index ``--train-n-steps`` of the epoch: the epoch ends (the original's
   quirk; ``--exact-train-n-steps`` stops after that many updates in all);
5. every ``--validate-every`` steps in all: single-token evaluation on
   ``--eval-split``; a new best perplexity is saved in ``best/``;
6. every ``--save-every`` steps of the epoch: the model in ``--output-dir`` and a
   resumable checkpoint in ``--output-dir/resume``.

SIGINT or SIGTERM ends the run after the current step with a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..data import load_chunks, make_prefixes
from ..errors import UserError
from ..fused import chunked_logit_statistics, fused_linear_scalegrad_loss
from ..generation import is_greedy, top_k_top_p_filtering
from ..hf import accepts, cache_argument, check_linear_head, linear_head, returned_cache, unwrap
from ..losses import scalegrad_loss
from ..metrics import aggregate_ranking_metrics, ngram_metrics, ranking_metrics_from_ranks
from ..unlikelihood import ngram_repeat_mask, sequence_penalty_loss
from . import checkpoint
from .evaluate import (chunk_logging_output, eval_singletoken, model_config_dict,
                       singletoken_filename, write_singletoken_result)
from .optim import build_optimizer, build_schedule
from .options import accumulation_steps
from .runtime import Runtime, check_positions, make_output_dir

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- #
# Losses of one chunk
# --------------------------------------------------------------------------- #

def token_loss(model, chunk: torch.Tensor, gamma: float, runtime: Runtime):
    """ScaleGrad loss of one chunk (``(n + 1,)`` ids): ``(loss / n, logging_output)``."""
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        logits = model(input_ids=inp).logits
    loss = scalegrad_loss(logits, target, gamma)  # float32 whatever the autocast dtype
    ntokens = inp.numel()
    logging_output = chunk_logging_output(logits[0].detach().float(), target[0], loss.item())
    return loss / ntokens, logging_output


# --------------------------------------------------------------------------- #
# The memory-lean loss (--fused-loss)
# --------------------------------------------------------------------------- #

def fused_token_loss(model, chunk: torch.Tensor, gamma: float, runtime: Runtime, chunk_size: int):
    """:func:`token_loss` with ``--fused-loss``: the same ``(loss / n, logging_output)``,
    the loss computed from the base model's last hidden state and the output
    embedding by :func:`scalegrad.fused.fused_linear_scalegrad_loss`, at most
    ``chunk_size`` positions' logits at a time (its gradients are computed in this
    forward pass; ``backward`` applies them).

    The ranking metrics of the logging output come from logits remade chunk by
    chunk under ``torch.no_grad()`` (:func:`chunked_logit_statistics`). Under
    ``--fp16/--bf16`` the base model and the head's matmuls run in autocast as in
    the plain path; the loss itself is float32.

    ``model`` may be wrapped in DistributedDataParallel: the base model is called
    directly, bypassing the wrapper, so the caller averages the gradients by hand.
    """
    base, head = linear_head(model)
    inp, target = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
    with runtime.autocast():
        hidden = base(input_ids=inp).last_hidden_state
        loss = fused_linear_scalegrad_loss(hidden, head.weight, target, gamma, bias=head.bias,
                                           chunk_size=chunk_size)
        stats = chunked_logit_statistics(hidden, head.weight, head.bias, target, chunk_size,
                                         nll=False)
    ntokens = inp.numel()
    # As chunk_logging_output builds it from the logits.
    logging_output = ranking_metrics_from_ranks(stats["higher"], stats["predictions"], target[0],
                                                ntokens=ntokens)
    logging_output["loss"] = loss.item()
    logging_output["normalizer"] = ntokens
    logging_output["sample_size"] = ntokens
    logging_output["ntokens"] = ntokens
    return loss / ntokens, logging_output


def continue_with_logits(model, prefixes: torch.Tensor, continuation_length: int,
                         top_k: int, top_p: float, runtime: Runtime):
    """Continue ``prefixes`` (``(B, P)``) keeping the graph: ``(continuations (B, C),
    logits (B, C, V))``. Greedy when ``top_k == 1 and top_p == 0``, else sampled
    from the filtered distribution with the global torch random state."""
    greedy = is_greedy(top_k, top_p)
    cache_keyword = cache_argument(model)
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    next_input, cache = prefixes, None
    tokens, step_logits = [], []
    for _ in range(continuation_length):
        with runtime.autocast():
            output = model(input_ids=next_input, use_cache=True, **{cache_keyword: cache}, **extra)
        logits = output.logits[:, -1, :].float()
        cache = returned_cache(output)
        with torch.no_grad():
            if greedy:
                next_input = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p), dim=-1)
                next_input = torch.multinomial(probs, num_samples=1)
        tokens.append(next_input)
        step_logits.append(logits)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


def sequence_loss(model, chunk: torch.Tensor, args, runtime: Runtime):
    """Sequence-level unlikelihood of one chunk (``docs/reference.md``, section 7; the
    parent script's ``ul_seq``):
    continue every prefix of the chunk, penalise the tokens of repeated N-grams;
    ``(loss / generated tokens, logging_output)``."""
    prefixes = make_prefixes(chunk.unsqueeze(0), args.prefix_length)
    continuations, logits = continue_with_logits(
        model, prefixes, args.continuation_length, args.top_k, args.top_p, runtime)
    mask = ngram_repeat_mask(continuations, args.sequence_ngram_n)
    loss = sequence_penalty_loss(F.log_softmax(logits, dim=-1), continuations, mask)
    ntokens = continuations.numel()
    logging_output = {
        "seq_loss": loss.item(),
        "seq_sample_size": ntokens,
        "seq_ntokens": ntokens,
        "seq_nsentences": continuations.size(0),
        "seq_repeat_mask": float(mask.sum()),
    }
    sums: dict[str, float] = defaultdict(float)
    for row in continuations.tolist():
        # pad=1 as the parent script (fairseq's padding id; for GPT-2 ids a quirk).
        for key, value in ngram_metrics(row).items():
            sums[key] += value
    logging_output.update(sums)
    return loss / ntokens, logging_output


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


def aggregate_sequence_logging_outputs(logging_outputs: list[dict]) -> dict:
    """The parent script's sequence-level training metrics (``seq_*``), as its
    ``SequencePenaltyCriterion.aggregate_logging_outputs``."""
    loss_sum = sum(log.get("seq_loss", 0) for log in logging_outputs)
    ntokens = sum(log.get("seq_ntokens", 0) for log in logging_outputs)
    nsentences = sum(log.get("seq_nsentences", 0) for log in logging_outputs)
    sample_size = sum(log.get("seq_sample_size", 0) for log in logging_outputs)
    repeat_mask = sum(log.get("seq_repeat_mask", 0) for log in logging_outputs)
    out = {
        "seq_loss": loss_sum / max(sample_size, 1.0) / math.log(2),
        "seq_ntokens": ntokens,
        "seq_nsentences": nsentences,
        "seq_sample_size": sample_size,
        "seq_repeat_mask": repeat_mask / sample_size if sample_size > 0 else 0,
    }
    for n in range(1, 5):
        key = f"pct_repeat_{n}grams"
        total = sum(log.get(key, 0) for log in logging_outputs)
        out["seq_" + key] = total / nsentences if nsentences > 0 else 0
    if sample_size != ntokens:
        out["seq_nll_loss"] = loss_sum / max(ntokens, 1.0) / math.log(2)
    return out


def training_report(logging_outputs: list[dict]) -> dict:
    """What the original prints every ``--report-metrics-every`` steps."""
    report = aggregate_ranking_metrics(logging_outputs)
    report.update(aggregate_sequence_logging_outputs(logging_outputs))
    report["ppl"] = 2 ** report["loss"]
    return report


# --------------------------------------------------------------------------- #
# The plan: how many steps, epochs, the schedule's length
# --------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #

@dataclass
class Progress:
    """Where the loop is; saved in the checkpoint."""
    epoch: int = 0
    step: int = 0                  # next step index within the epoch
    total_steps: int = 0
    epoch_loss: float = 0.0
    best_ppl: float = 1e20
    logging_outputs: list = field(default_factory=list)
    consecutive_nonfinite: int = 0
    nonfinite_steps: int = 0       # skipped since the last report
    nonfinite_total: int = 0
    finished: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainResult:
    status: str                    # "finished", "interrupted", "already-finished"
    total_steps: int
    best_ppl: float
    last_report: dict | None = None


class _StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checks it after every step."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: stopping after this step with a checkpoint", self.signal_name)

    def request(self, name: str = "request") -> None:
        self.signal_name = name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _args_snapshot(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items())
            if v is None or isinstance(v, (bool, int, float, str))}


# Flags whose change on --resume changes the training trajectory.
_TRAJECTORY_FLAGS = ("seed", "gamma", "learning_rate", "adam_epsilon", "weight_decay",
                     "warmup_steps", "max_steps", "num_train_epochs", "train_batch_size",
                     "train_n_steps", "gradient_accumulation_steps", "max_grad_norm",
                     "sequence_tune_rate", "sequence_ngram_n", "prefix_length",
                     "continuation_length", "top_k", "top_p", "enable_dropout",
                     "exact_train_n_steps", "adamw", "fp16", "bf16")


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
        for name, length in (("--train-batch-size", args.train_batch_size),
                             ("--batch-size-singletoken", args.batch_size_singletoken)):
            check_positions(model, name, length)
        if args.sequence_tune_rate > 0:
            check_positions(model, "--prefix-length + --continuation-length",
                             args.prefix_length + args.continuation_length)
        validates = args.validate_every <= self.plan.planned_updates(args)
        self.eval_chunks = None
        if validates:
            if args.eval_split is None:
                raise UserError(f"training validates every {args.validate_every} steps on "
                                f"--eval-split, which is not given; pass --eval-split valid")
            self.eval_chunks = load_chunks(args.data_base, args.eval_split,
                                           args.batch_size_singletoken, vocab_size)

        self.model = model.to(device)
        if args.fused_loss:
            check_fused_model(self.model, self.train_chunks[0][:16].unsqueeze(0).to(device),
                              args.model_load_dir or args.model_name)
        self.model.train(args.enable_dropout)
        self.ddp_model = self.model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        self.optimizer = build_optimizer(self.model, learning_rate=args.learning_rate,
                                         adam_epsilon=args.adam_epsilon,
                                         weight_decay=args.weight_decay, kind=args.adamw)
        self.scheduler = build_schedule(self.optimizer, warmup_steps=args.warmup_steps,
                                        total_steps=self.plan.total_schedule_steps)
        self.scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
        # The chunk order and the choice of sequence-level steps come from their own
        # generators, the same on every process.
        self.order_rng = torch.Generator().manual_seed(args.seed)
        self.decision_rng = torch.Generator().manual_seed(args.seed + 1)
        self.order: torch.Tensor | None = None
        self.progress = Progress()
        self.stop = _StopRequest()
        self.last_report: dict | None = None
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
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
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
        if self.scaler is not None and state.get("scaler") is not None:
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

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _sync_gradients(self) -> None:
        """Average the gradients over the processes by hand (after steps DDP did not sync)."""
        if not self.runtime.distributed:
            return
        for p in self.model.parameters():
            if p.grad is not None:
                self.runtime.all_reduce_mean_(p.grad)

    def train_step(self, chunk_indices: list[int]) -> tuple[bool, list[dict], float]:
        """One update over ``chunk_indices`` (one chunk per accumulation step).

        Returns ``(updated, logging_outputs, loss)``; ``updated`` is False when a
        loss was not finite on some process (then nothing changes).
        """
        args, runtime = self.args, self.runtime
        self.optimizer.zero_grad(set_to_none=True)
        logs, loss_total = [], 0.0
        last = len(chunk_indices) - 1
        ddp = self.ddp_model is not self.model
        synced_by_ddp = False
        for micro, index in enumerate(chunk_indices):
            chunk = self.train_chunks[index].to(runtime.device)
            sequence_step = (args.sequence_tune_rate > 0 and
                             torch.rand(1, generator=self.decision_rng).item() < args.sequence_tune_rate)
            fused_step = args.fused_loss and not sequence_step
            # DDP syncs gradients in the backward of the last token-level step; the
            # sequence-level step runs several forward passes, and the fused step calls
            # the base model past the DDP wrapper, so they never sync through DDP and
            # the gradients are averaged by hand instead.
            sync = ddp and micro == last and not sequence_step and not fused_step
            context = contextlib.nullcontext() if (sync or not ddp) else self.ddp_model.no_sync()
            with context:
                if sequence_step:
                    loss, log = sequence_loss(self.ddp_model, chunk, args, runtime)
                elif fused_step:
                    loss, log = fused_token_loss(self.model, chunk, args.gamma, runtime,
                                                 args.fused_chunk_size)
                else:
                    loss, log = token_loss(self.ddp_model, chunk, args.gamma, runtime)
                if runtime.any_rank(not torch.isfinite(loss).item()):
                    self.optimizer.zero_grad(set_to_none=True)
                    return False, [], float("nan")
                self._backward(loss / len(chunk_indices))
            synced_by_ddp = sync
            logs.append(log)
            loss_total += loss.item()
        if ddp and not synced_by_ddp:
            self._sync_gradients()
        if args.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return True, logs, loss_total / len(chunk_indices)

    # ---- reporting, validation ----

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
        progress.logging_outputs = []
        progress.nonfinite_steps = 0

    def validate(self) -> None:
        args, runtime, progress = self.args, self.runtime, self.progress
        if runtime.is_main:
            logger.info("validating on %s after %d steps", args.eval_split, progress.total_steps)
        metrics = eval_singletoken(self.model, self.eval_chunks, runtime, desc="Validating")
        if runtime.is_main:
            config = model_config_dict(self.model)
            write_singletoken_result(self.output_dir, args, metrics, config, step=progress.total_steps)
            if metrics["ppl"] < progress.best_ppl:
                checkpoint.save_best(self.output_dir, self.model, self.tokenizer,
                                     singletoken_filename(args, progress.total_steps),
                                     {"metrics": metrics, "config": config})
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
            make_output_dir(self.output_dir)
            (make_output_dir(self.output_dir) / checkpoint.BEST_DIR).mkdir(exist_ok=True)
            logger.info("training: %d chunks of %d + 1 tokens, %d update(s) per epoch per process, "
                        "%d epoch(s), schedule over %d steps, %d process(es)", plan.num_chunks,
                        args.train_batch_size, plan.updates_per_epoch, plan.num_epochs,
                        plan.total_schedule_steps, runtime.world_size)
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
            if runtime.is_main:
                logger.warning("stopped (%s) after %d steps; the checkpoint is in %s",
                               self.stop.signal_name, progress.total_steps,
                               checkpoint.resume_dir(self.output_dir))
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
