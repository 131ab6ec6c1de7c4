"""``run(args)``: the four modes of ``scripts/run_gpt2.py``.

Everything a user can get wrong (paths, flag values, the data, the model) is
checked before any result file or checkpoint is written, so a mistake ends with
one line and leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..data import load_chunks
from . import checkpoint
from .evaluate import (eval_completion, eval_singletoken, model_config_dict,
                       write_completion_result, write_singletoken_result)
from .runtime import (check_output_dir, check_positions, load_model, load_tokenizer_for,
                      make_output_dir, model_source, seed_everything, setup_runtime,
                      teardown_runtime)

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    mode: str
    files: list[str] = field(default_factory=list)
    singletoken: dict | None = None
    completion: dict | None = None
    train: Any = None
    resume_hint: str | None = None
    output_dir: str | None = None


def configure_logging(rank: int = 0) -> None:
    """INFO on rank 0, warnings only on the other ranks (once per process)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                            datefmt="%m/%d/%Y %H:%M:%S", level=level)
    logging.getLogger("scalegrad").setLevel(level)


def run(args, *, on_step: Callable | None = None) -> RunResult:
    """Run ``args.mode``; returns what was computed and written (for tests and callers)."""
    configure_logging(int(os.environ.get("RANK", "0")))
    logger.info("arguments: %s", vars(args))
    check_output_dir(args.output_dir)
    runtime = setup_runtime(args)
    try:
        seed_everything(args.seed + runtime.rank)
        if args.mode == "train":
            return _train(args, runtime, on_step)
        return _evaluate(args, runtime)
    finally:
        teardown_runtime(runtime)


def _model_flag(args) -> str:
    return "--model-load-dir" if args.model_load_dir else "--model-name"


def _evaluate(args, runtime) -> RunResult:
    result = RunResult(args.mode)
    singletoken = args.mode in ("eval-singletoken", "eval-both")
    completion = args.mode in ("eval-completion", "eval-both")

    # Load and check everything first.
    source = model_source(args)
    model = load_model(source, flag=_model_flag(args))
    vocab_size = model.config.vocab_size
    tokenizer = load_tokenizer_for(args, source) if completion else None
    singletoken_chunks = completion_chunks = None
    if singletoken:
        check_positions(model, "--batch-size-singletoken", args.batch_size_singletoken)
        singletoken_chunks = load_chunks(args.data_base, args.eval_split,
                                         args.batch_size_singletoken, vocab_size)
    if completion:
        check_positions(model, "--prefix-length + --continuation-length",
                      args.prefix_length + args.continuation_length)
        completion_chunks = load_chunks(args.data_base, args.eval_split,
                                        args.batch_size_completion, vocab_size)
    model.to(runtime.device)
    config = model_config_dict(model)
    output_dir = make_output_dir(args.output_dir) if runtime.is_main else None

    if singletoken:
        metrics = eval_singletoken(model, singletoken_chunks, runtime)
        result.singletoken = metrics
        if runtime.is_main:
            logger.info("single-token metrics: %s", metrics)
            path = write_singletoken_result(output_dir, args, metrics, config)
            result.files.append(str(path))
    if completion:
        report = eval_completion(model, tokenizer, completion_chunks, runtime, args)
        if runtime.is_main:
            result.completion = report
            logger.info("completion metrics: %s %s uniq %d", report["bpe_metrics"],
                        report["word_metrics"], report["uniq"])
            path = write_completion_result(output_dir, args, report, config)
            result.files.append(str(path))
    runtime.barrier()
    return result


def _train(args, runtime, on_step) -> RunResult:
    from .tracking import close_sinks, open_sinks
    from .trainer import Trainer, _args_snapshot

    resume_state = None
    source, flag = model_source(args), _model_flag(args)
    if runtime.is_main:  # what a crash of an earlier run left (docs/failure-behaviour.md)
        checkpoint.recover_output_dir(args.output_dir)
    runtime.barrier()
    if args.resume:
        resume_state = checkpoint.load_training_state(args.output_dir)
        if resume_state is None:
            if runtime.is_main:
                logger.warning("--resume: no checkpoint in %s; starting afresh",
                               checkpoint.resume_dir(args.output_dir))
        else:
            source, flag = str(checkpoint.resume_dir(args.output_dir)), "--resume"
    model = load_model(source, flag=flag)
    tokenizer = load_tokenizer_for(args, source)
    trainer = Trainer(args, runtime, model, tokenizer, resume_state=resume_state, on_step=on_step)
    # TensorBoard / W&B (rank 0): opened once everything is checked, before training.
    sinks = open_sinks(args, config=_args_snapshot(args)) if runtime.is_main else []
    trainer.scalar_sinks.extend(sinks)
    try:
        outcome = trainer.run()
    finally:
        close_sinks(sinks)
    result = RunResult("train", train=outcome, output_dir=str(args.output_dir))
    if outcome.status == "interrupted":
        result.resume_hint = (f"stopped after {outcome.total_steps} steps; the checkpoint is in "
                              f"{checkpoint.resume_dir(args.output_dir)}; to continue, run the "
                              f"same command with --resume")
    return result
