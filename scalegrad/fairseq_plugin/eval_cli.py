"""The command line of ``scripts/evaluate_fairseq.py``: the original fairseq
evaluation script's flags and defaults (``docs/reference.md``, fairseq
evaluation), a few of ours, and the loop over the chosen checkpoints.

Everything for one checkpoint is computed before its files are written (each
atomically), and every mistake a user can make ends in one ``error:`` line
(:class:`scalegrad.errors.UserError`) with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

from ..cli import configure_logging
from ..errors import UserError, reports_user_errors
from .checkpoints import find_checkpoints

logger = logging.getLogger(__name__)

MODES = ("all", "completion", "singletoken")
ORIGINAL_COMPLETION_LENGTH = 500
GPT2_COMPLETION_LENGTH = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate_fairseq.py",
        description="Evaluate fairseq language model checkpoints on one split as the unlikelihood "
                    "module's evaluation script did: completions (greedy, top-k, top-p or beam "
                    "search), single-token predictions, targets and metrics, in files named with "
                    "the original's suffix (report them with report_metrics.py --eval-dirs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--data-dir", "--data", dest="data_dir", required=True,
        help="the fairseq data-bin (for gpt2_pretrained also a folder of .pt splits)")
    add("--base-dir", default=None,
        help="accepted for the original's command lines; unused (the plugin is found through "
             "the installed package)")
    add("--eval-mode", "--mode", dest="eval_mode", choices=MODES, default="all")
    add("--data-prefix-length", "--prefix-length", dest="data_prefix_length", type=int, default=50,
        help="length of each prefix")
    add("--batch-size-completions", type=int, default=128,
        help="prefixes per completion block (blocks of prefix length x this many tokens)")
    add("--batch-size-single-prediction", "--batch-size-singletoken",
        dest="batch_size_single_prediction", type=int, default=1024,
        help="tokens per single-token block")
    add("--completion-length", "--continuation-length", dest="completion_length", type=int,
        default=None, help=f"tokens generated after each prefix (default "
                           f"{ORIGINAL_COMPLETION_LENGTH}, as the original; "
                           f"{GPT2_COMPLETION_LENGTH} with --result-format gpt2)")
    which = parser.add_argument_group("checkpoints (--model-path with --ckpt, or --checkpoint)")
    which.add_argument("--model-path", default=None, help="the folder of checkpoints")
    which.add_argument("--checkpoint", "--path", dest="checkpoint", nargs="+", default=None,
                       help="checkpoint file(s) instead of --model-path")
    which.add_argument("--ckpt", choices=("best", "last", "all", "step", "epoch"), default="best")
    which.add_argument("--ckpt-step", default=None, help="N of checkpoint_*_N.pt (--ckpt step)")
    which.add_argument("--ckpt-epoch", default=None, help="N of checkpointN.pt (--ckpt epoch)")
    add("--save-path", "--output-dir", dest="save_path", required=True,
        help="where the result files go (created if missing)")
    add("--data-split", "--eval-split", dest="data_split", choices=("train", "valid", "test"),
        default="valid")
    add("--num-samples", type=int, default=-1,
        help="stop the completions after block index N (-1: all blocks)")
    add("--beam-size", type=int, default=1,
        help="beam search (fairseq's SequenceGenerator) when > 1; needs --topk 1 --topp 0")
    add("--beam-ngram-block", type=int, default=0,
        help="with beam search: no n-gram of this size repeats (0: off)")
    add("--topp", "--top-p", dest="topp", type=float, default=0.0, help="nucleus sampling if > 0")
    add("--topk", "--top-k", dest="topk", type=int, default=1,
        help="1 with --topp 0 is greedy; > 1 samples among the k most likely")
    add("--penalty-alpha", type=float, default=None, metavar="A",
        help="completions by contrastive search (not in the original; docs/contrastive-search.md): "
             "at each step the --topk K most probable tokens are scored (1 - A) * p(v) - A * "
             "(max cosine between v's decoder features and those of the prefix and the tokens "
             "so far), the best taken; A in [0, 1], needs --topk K > 1, --topp 0, --beam-size 1; "
             "the file names end in __alpha_A")
    add("--singletoken-topk", type=int, default=1,
        help="> 1: also the top-k masses of the single-token pass")
    add("--singletoken-topp", type=float, default=0.0,
        help="> 0: also the nucleus masses of the single-token pass")
    ours = parser.add_argument_group("not in the original")
    ours.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default: cuda when available")
    ours.add_argument("--seed", type=int, default=42, help="seed of every random draw")
    ours.add_argument("--blocks-per-batch", type=int, default=1,
                      help="single-token blocks per forward pass (the same numbers for any value)")
    ours.add_argument("--no-progress", action="store_true", help="no progress bars")
    ours.add_argument("--result-format", choices=("original", "gpt2"), default="original",
                      help="gpt2: gpt2_pretrained checkpoints only, results named and shaped like "
                           "run_gpt2.py's (singletoken__*.json, completion__*.json)")
    gpt2 = parser.add_argument_group("only with --result-format gpt2")
    gpt2.add_argument("--model-name", default=None,
                      help="name in the file names; default: FOLDER-STEM of each checkpoint")
    gpt2.add_argument("--tokenizer", default=None,
                      help="tokenizer that decodes completions; default: the checkpoint's")
    gpt2.add_argument("--batch-size-completion", type=int, default=300,
                      help="tokens per completion chunk (chunks of N + 1, as run_gpt2.py)")
    gpt2.add_argument("--completion-batch-size", type=int, default=None,
                      help="prefixes continued together; default: the prefixes of one chunk")
    return parser


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_args(args) -> None:
    """Every flag value the evaluation cannot use, as one :class:`UserError`."""
    _require((args.checkpoint is None) != (args.model_path is None),
             "give either --model-path DIR (with --ckpt) or --checkpoint FILE(s)")
    gpt2 = args.result_format == "gpt2"
    if args.completion_length is None:
        args.completion_length = GPT2_COMPLETION_LENGTH if gpt2 else ORIGINAL_COMPLETION_LENGTH
    for name in ("data_prefix_length", "batch_size_completions", "batch_size_single_prediction",
                 "completion_length", "beam_size", "blocks_per_batch", "batch_size_completion"):
        value = getattr(args, name)
        _require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    _require(args.topk >= 0, f"--topk must be >= 0, got {args.topk}")
    for name in ("topp", "singletoken_topp"):
        value = getattr(args, name)
        _require(0.0 <= value <= 1.0 and not math.isnan(value),
                 f"--{name.replace('_', '-')} must be between 0 and 1, got {value}")
    _require(args.topk >= 1 or args.topp > 0,
             "--topk 0 samples from nothing: give --topk >= 1 or --topp > 0")
    _require(args.singletoken_topk >= 1, f"--singletoken-topk must be >= 1, got {args.singletoken_topk}")
    _require(args.beam_ngram_block >= 0, f"--beam-ngram-block must be >= 0, got {args.beam_ngram_block}")
    if args.penalty_alpha is not None:
        from ..generation import check_contrastive

        check_contrastive(args.penalty_alpha, args.topk, args.topp)
        _require(args.beam_size == 1, "--penalty-alpha (contrastive search) needs --beam-size 1")
    if args.beam_size > 1:
        _require(args.topk == 1 and args.topp == 0.0,
                 "beam search (--beam-size > 1) needs --topk 1 and --topp 0")
    else:
        _require(args.beam_ngram_block == 0, "--beam-ngram-block needs --beam-size > 1")
    if gpt2:
        _require(args.data_prefix_length < args.batch_size_completion + 1,
                 f"--data-prefix-length {args.data_prefix_length} must be shorter than the "
                 f"completion chunk of --batch-size-completion {args.batch_size_completion} + 1")
        if args.completion_batch_size is not None:
            _require(args.completion_batch_size >= 1,
                     f"--completion-batch-size must be at least 1, got {args.completion_batch_size}")
    if args.ckpt == "step":
        _require(args.checkpoint is not None or args.ckpt_step is not None, "--ckpt step needs --ckpt-step N")
    if args.ckpt == "epoch":
        _require(args.checkpoint is not None or args.ckpt_epoch is not None, "--ckpt epoch needs --ckpt-epoch N")


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, which is not available here; use --device cpu")
    return device


def check_save_path(save_path: Path) -> None:
    """``--save-path`` must be a folder or creatable as one (no file on the way)."""
    for path in (save_path, *save_path.parents):
        if path.exists():
            _require(path.is_dir(), f"--save-path {save_path}: {path} is a file, not a folder; "
                                    f"choose another --save-path")
            _require(os.access(path, os.W_OK | os.X_OK),
                     f"--save-path {save_path}: cannot write into {path}")
            return


def _check_positions(loaded, length: int, what: str) -> None:
    positions = loaded.max_positions()
    if positions is None or length <= positions:
        return
    if loaded.positions_are_sinusoidal():
        logger.warning("%s: %d tokens, more than the %d positions %s was trained with",
                       what, length, positions, loaded.path)
        return
    raise UserError(f"{what} is {length} tokens, longer than the model's {positions} positions; "
                    f"lower it")


def run_evaluation(args) -> list[str]:
    """Evaluate every selected checkpoint; returns the files written."""
    from .evaluation import completion_pass, single_token_pass
    from .gpt2_results import evaluate_gpt2_format
    from .loading import load_model
    from .results import (completion_text_metrics, filename_suffix, model_name,
                          write_completions, write_single_token_results, write_text_metrics)

    save_path = Path(args.save_path).expanduser()
    check_save_path(save_path)
    checkpoints = args.checkpoint or find_checkpoints(args.model_path, args.ckpt, args.ckpt_step,
                                                      args.ckpt_epoch)
    device = _device(args.device)
    progress = not args.no_progress
    completion = args.eval_mode in ("all", "completion")
    singletoken = args.eval_mode in ("all", "singletoken")
    logger.info("Evaluating %d checkpoints.", len(checkpoints))
    written: list[str] = []
    for checkpoint in checkpoints:
        loaded = load_model(checkpoint, args.data_dir, device=device)
        if completion:
            _check_positions(loaded, args.data_prefix_length + args.completion_length,
                             "--data-prefix-length + --completion-length")
        if singletoken:
            _check_positions(loaded, args.batch_size_single_prediction, "--batch-size-single-prediction")
        logger.info("evaluating %s (step %s) on %s", checkpoint, loaded.num_updates, args.data_split)
        if args.result_format == "gpt2":
            written += evaluate_gpt2_format(loaded, args, save_path)
            continue
        folder = args.model_path or os.path.dirname(os.path.abspath(os.path.expanduser(checkpoint)))
        suffix = filename_suffix(
            model=model_name(folder), step=loaded.num_updates, split=args.data_split,
            prefix_length=args.data_prefix_length, completion_length=args.completion_length,
            batch_size_completions=args.batch_size_completions,
            batch_size_single_prediction=args.batch_size_single_prediction,
            beam_size=args.beam_size, beam_ngram_block=args.beam_ngram_block, topk=args.topk,
            topp=args.topp, singletoken_topk=args.singletoken_topk,
            singletoken_topp=args.singletoken_topp, ckpt_step=args.ckpt_step,
            ckpt_epoch=args.ckpt_epoch, ckpt=args.ckpt)
        if args.penalty_alpha is not None:
            suffix += f"__alpha_{float(args.penalty_alpha)}"
        completions = single = None
        references: list = []
        if completion:
            completions = completion_pass(
                loaded, args.data_split, prefix_length=args.data_prefix_length,
                prefixes_per_block=args.batch_size_completions,
                completion_length=args.completion_length, top_k=args.topk, top_p=args.topp,
                beam_size=args.beam_size, beam_ngram_block=args.beam_ngram_block,
                num_samples=args.num_samples, seed=args.seed, penalty_alpha=args.penalty_alpha,
                progress=progress, references=references)
            text_metrics = completion_text_metrics(loaded.dictionary, completions, references,
                                                   args.data_prefix_length)
        if singletoken:
            single = single_token_pass(
                loaded, args.data_split, args.batch_size_single_prediction,
                top_k=args.singletoken_topk, top_p=args.singletoken_topp,
                blocks_per_batch=args.blocks_per_batch, seed=args.seed, progress=progress)
            logger.info("single-token metrics: %s", single[0])
        save_path.mkdir(parents=True, exist_ok=True)
        if completions is not None:
            written.append(write_completions(save_path, suffix, loaded.dictionary, completions))
            written.append(write_text_metrics(save_path, suffix, text_metrics))
        if single is not None:
            metrics, predictions, targets = single
            written += write_single_token_results(save_path, suffix, loaded.dictionary,
                                                  args.data_split, metrics, predictions, targets,
                                                  loaded.num_updates)
    return written


@reports_user_errors
def main(argv=None) -> int:
    """``evaluate_fairseq.py`` (``scalegrad-evaluate-fairseq``): 0 on success, 2 with one
    ``error:`` line on a user's mistake."""
    configure_logging(logging.INFO)
    args = parse_args(argv)
    written = run_evaluation(args)
    for path in written:
        print(f"written: {path}")
    return 0
