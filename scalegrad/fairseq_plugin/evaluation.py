"""Evaluating and exporting fairseq checkpoints of ``gpt2_pretrained`` models.

The logic behind ``scripts/evaluate_fairseq.py`` (the port of the unlikelihood
module's ``custom/evaluation.py``, ``docs/reference.md``, section 6a) and
``scripts/export_fairseq_to_hf.py``.

Evaluation reads a fairseq checkpoint written by ``fairseq-train --task
gpt2_language_modeling --arch gpt2_pretrained`` and runs the GPT-2 driver's two
evaluations on one split, through the fairseq task's data (``.pt`` splits or a
data-bin) and the fairseq model:

* single-token: chunks of ``batch_size_singletoken + 1`` ids, one per forward
  pass of the fairseq model, the metrics of section 2 computed by the same
  functions as ``run_gpt2.py --mode eval-singletoken``;
* completion: the prefixes of chunks of ``batch_size_completion + 1`` ids,
  continued by the GPT-2 driver's own generation code (greedy, top-k, top-p,
  with the same seeding and batching, so the completions are the driver's), or,
  with ``beam_size > 1``, by fairseq's ``SequenceGenerator`` over the fairseq
  model's incremental decoder (``beam_ngram_block``: fairseq's n-gram blocking).

Result files carry the GPT-2 driver's names and keys, so ``report_metrics.py``
reads both drivers' results; the original's extra outputs (single-token
predictions, targets, the metrics dictionary) are JSON instead of text and pickle.

Beam search: fairseq's generator always starts a hypothesis with a
beginning-of-sequence token. Here that position holds each prefix's first id
(the prefix's other ids are forced as fairseq's ``prefix_tokens``), so the model
reads exactly the prefix, as in greedy decoding; beam size 1 then gives the
greedy continuations. The generator ends a hypothesis on the end-of-text id, so
that id is banned until the continuation has its full length (greedy decoding
may produce it).

Export needs no fairseq: the Hugging Face config recorded in the checkpoint and
the weights under ``decoder.model.`` give back the Hugging Face model.
"""

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from ..io import write_json
from .checkpoints import (checkpoint_hf_config, checkpoint_num_updates, checkpoint_tokenizer_source,
                          find_checkpoints, read_checkpoint)

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- #
# Loading a checkpoint into fairseq
# --------------------------------------------------------------------------- #

@dataclass
class LoadedCheckpoint:
    path: str
    task: object
    model: object
    num_updates: Optional[int]
    tokenizer_source: Optional[str]
    hf_config: dict = field(default_factory=dict)

    @property
    def hf_model(self):
        return self.model.hf_model


def load_checkpoint(path, *, data: Optional[str] = None, device="cpu") -> LoadedCheckpoint:
    """The task and model of a ``gpt2_pretrained`` checkpoint, in evaluation mode.

    ``data`` replaces the data folder recorded in the checkpoint. The
    vocabulary comes from the checkpoint's recorded config, so neither the hub
    nor the original model folder is needed.
    """
    from fairseq import tasks
    from omegaconf import OmegaConf, open_dict

    from . import register

    register()  # the task and the model

    state = read_checkpoint(path)
    cfg = OmegaConf.create(state["cfg"])
    if data is not None:
        with open_dict(cfg.task):
            cfg.task.data = str(data)
    data_dir = str(cfg.task.get("data") or "")
    if not data_dir:
        raise UserError("the checkpoint records no data folder; pass --data")
    config = checkpoint_hf_config(state)
    eos = getattr(config, "eos_token_id", None)
    try:
        task = tasks.setup_task(cfg.task, from_checkpoint=True,
                                vocab_size=int(config.vocab_size), eos_id=eos)
        model = task.build_model(cfg.model, from_checkpoint=True)
    except UserError:
        raise
    except (ValueError, KeyError) as exc:
        raise UserError(f"cannot set up the checkpoint's task and model: {exc}") from None
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    model.to(device).eval()
    return LoadedCheckpoint(str(path), task, model, checkpoint_num_updates(state),
                            checkpoint_tokenizer_source(state), config.to_dict())


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #

def chunk_dataset(loaded: LoadedCheckpoint, split: str, length: int):
    """The split in chunks of ``length + 1`` ids, in order, as the task's dataset."""
    from ..data import chunk_tokens
    from .tasks.gpt2_language_modeling import GPT2ChunkDataset

    tokens = loaded.task.load_tokens(split)
    return GPT2ChunkDataset(chunk_tokens(tokens, length), shuffle=False)


@torch.no_grad()
def eval_singletoken(loaded: LoadedCheckpoint, split: str, length: int, *,
                     device="cpu", progress: bool = True) -> tuple[dict, list, list]:
    """``docs/reference.md``, section 2, over the split, one chunk per forward pass
    of the fairseq model.

    Returns ``(metrics, predictions, targets)``: the GPT-2 driver's aggregated
    metrics, and per chunk the argmax predictions and the targets (ids).
    """
    from ..gpt2.evaluate import statistics_logging_output
    from ..metrics import aggregate_ranking_metrics, token_statistics

    dataset = chunk_dataset(loaded, split, length)
    model = loaded.model
    logging_outputs, predictions, targets = [], [], []
    bar = _bar(progress, len(dataset), "Single-token", "chunk")
    for index in range(len(dataset)):
        sample = dataset.collater([dataset[index]])
        net_output = model(**{k: v.to(device) for k, v in sample["net_input"].items()})
        logits = net_output[0][0].float()
        target = sample["target"][0].to(device)
        # The GPT-2 driver's computation, so both drivers give the same numbers.
        stats = token_statistics(logits, target)
        logging_outputs.append(statistics_logging_output(stats, target))
        predictions.append(stats["predictions"].tolist())
        targets.append(target.tolist())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    metrics = aggregate_ranking_metrics(logging_outputs)
    metrics["ppl"] = 2 ** metrics["loss"]
    metrics["uniq"] = len({token for chunk in predictions for token in chunk})
    metrics["human_uniq"] = len({token for chunk in targets for token in chunk})
    return metrics, predictions, targets


def completion_prefixes(loaded: LoadedCheckpoint, split: str, length: int,
                        prefix_length: int) -> tuple[torch.Tensor, int]:
    """``(prefixes, prefixes per chunk)`` of the split's chunks of ``length + 1`` ids."""
    from ..data import make_prefixes

    chunks = chunk_dataset(loaded, split, length).chunks.long()
    prefixes = make_prefixes(chunks, prefix_length)
    return prefixes, prefixes.size(0) // chunks.size(0)


def sampled_completions(loaded: LoadedCheckpoint, prefixes: torch.Tensor, *, continuation_length: int,
                        top_k: int, top_p: float, batch_size: int, seed: int, device="cpu",
                        progress: bool = True) -> list[list[int]]:
    """Greedy / top-k / top-p: the GPT-2 driver's own code, seeding and batching."""
    from ..gpt2.evaluate import generate_completions
    from ..gpt2.runtime import Runtime

    runtime = Runtime(device=torch.device(device), progress=progress)
    return generate_completions(loaded.hf_model, prefixes, runtime,
                                continuation_length=continuation_length, top_k=top_k, top_p=top_p,
                                batch_size=batch_size, seed=seed)


@torch.no_grad()
def beam_completions(loaded: LoadedCheckpoint, prefixes: torch.Tensor, *, continuation_length: int,
                     beam_size: int, ngram_block: int = 0, batch_size: int, device="cpu",
                     progress: bool = True) -> list[list[int]]:
    """Beam search with fairseq's ``SequenceGenerator`` (see the module doc)."""
    from fairseq.sequence_generator import SequenceGenerator

    eos = loaded.task.target_dictionary.eos()
    if eos >= loaded.task.target_dictionary.pad():
        raise UserError("beam search needs the model's end-of-text id, which its config does not "
                        "give (eos_token_id)")
    prefix_length = prefixes.size(1)
    steps = prefix_length - 1 + continuation_length  # forced prefix ids + the continuation
    generator = SequenceGenerator(
        [loaded.model], loaded.task.target_dictionary, beam_size=beam_size,
        max_len_a=0, max_len_b=steps, max_len=prefix_length + continuation_length,
        min_len=steps, no_repeat_ngram_size=ngram_block, eos=eos)
    if generator.repeat_ngram_blocker is not None:
        generator.repeat_ngram_blocker = _ContinuationNgramBlock(generator.repeat_ngram_blocker,
                                                                 first_step=prefix_length - 1)
    completions: list[list[int]] = []
    bar = _bar(progress, prefixes.size(0), "Beam search", "prefix")
    for start in range(0, prefixes.size(0), batch_size):
        batch = prefixes[start:start + batch_size].to(device)
        sample = {"net_input": {"src_tokens": batch,
                                "src_lengths": torch.full((batch.size(0),), prefix_length,
                                                          dtype=torch.long, device=device)}}
        hypotheses = generator.generate(
            [loaded.model], sample, prefix_tokens=batch[:, 1:],
            # One first id per row (fairseq takes a single int; a tensor fills the column).
            bos_token=batch[:, 0].repeat_interleave(beam_size))
        for row, hypos in zip(batch.tolist(), hypotheses):
            best = hypos[0]["tokens"].tolist()
            if best[:prefix_length - 1] != row[1:]:
                raise RuntimeError("fairseq's beam search did not keep the prefix")
            completions.append(row + best[prefix_length - 1:prefix_length - 1 + continuation_length])
        if bar is not None:
            bar.update(batch.size(0))
    if bar is not None:
        bar.close()
    return completions


class _ContinuationNgramBlock(torch.nn.Module):
    """fairseq's n-gram blocker, applied only where the continuation is generated.

    fairseq blocks after forcing the prefix tokens, so a prefix that itself repeats
    an n-gram would have its forced token banned (every candidate at ``-inf``).
    The n-grams of the prefix still count: a continuation never repeats them.
    fairseq's CPU fallback (used without its CUDA extension) reads the last
    ``n - 1`` entries of the whole token buffer, which are padding, so it never
    blocks anything; it is handed the tokens generated so far instead.
    """

    def __init__(self, blocker, first_step: int):
        super().__init__()
        self.blocker = blocker
        self.first_step = first_step

    def forward(self, tokens, lprobs, bsz: int, beam_size: int, step: int):
        if step < self.first_step:
            return lprobs
        if not getattr(self.blocker, "use_extension", False):
            tokens = tokens[:, :step + 1]
        return self.blocker(tokens, lprobs, bsz, beam_size, step)


def _bar(progress: bool, total: int, desc: str, unit: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


# --------------------------------------------------------------------------- #
# Result files
# --------------------------------------------------------------------------- #

def result_names(model_name: str, split: str, bsz_singletoken: int, bsz_completion: int,
                 prefix_length: int, continuation_length: int, top_k: int, top_p: float,
                 beam_size: int = 1, ngram_block: int = 0) -> dict:
    """File names of one evaluation: the GPT-2 driver's for the shared results
    (``singletoken``, ``completion``), plus the extra outputs.

    Beam search adds ``__beam_{B}__ngb_{N}`` to the completion file name (nothing
    for beam size 1, so greedy names are the driver's).
    """
    from types import SimpleNamespace

    from ..gpt2.evaluate import completion_filename, singletoken_filename

    args = SimpleNamespace(model_name=model_name, eval_split=split,
                           batch_size_singletoken=bsz_singletoken,
                           batch_size_completion=bsz_completion, prefix_length=prefix_length,
                           continuation_length=continuation_length, top_k=top_k, top_p=top_p)
    singletoken = singletoken_filename(args)
    completion = completion_filename(args)
    if beam_size > 1:
        completion = completion[:-len(".json")] + f"__beam_{beam_size}__ngb_{ngram_block}.json"
    stem = singletoken[len("singletoken__"):]
    return {
        "singletoken": singletoken,
        "predictions": "predictions__" + stem,
        "targets": "targets__" + stem,
        "metrics": "metrics__" + stem,
        "completion": completion,
    }


def write_singletoken_results(output_dir, names: dict, split: str, metrics: dict, predictions,
                              targets, loaded: LoadedCheckpoint) -> list[str]:
    output_dir = Path(output_dir)
    checkpoint = {"path": loaded.path, "num_updates": loaded.num_updates}
    files = {
        "singletoken": {"metrics": metrics, "config": loaded.hf_config, "checkpoint": checkpoint},
        "predictions": {"split": split, "predictions": predictions},
        "targets": {"split": split, "targets": targets},
        # The original pickled {'{split}/{name}': value, 'checkpoint_step': step}.
        "metrics": {**{f"{split}/{k}": v for k, v in metrics.items()},
                    "checkpoint_step": loaded.num_updates},
    }
    written = []
    for kind, content in files.items():
        path = output_dir / names[kind]
        write_json(path, content)
        written.append(str(path))
    return written


def write_completion_result(output_dir, names: dict, report: dict, completion_ids, decoding: dict,
                            loaded: LoadedCheckpoint) -> str:
    path = Path(output_dir) / names["completion"]
    write_json(path, {
        "bpe_metrics": report["bpe_metrics"],
        "word_metrics": report["word_metrics"],
        "uniq": report["uniq"],
        "config": loaded.hf_config,
        "completions": report["completions"],
        "completion_ids": completion_ids,
        "decoding": decoding,
        "checkpoint": {"path": loaded.path, "num_updates": loaded.num_updates},
    })
    return str(path)


# --------------------------------------------------------------------------- #
# The command line of scripts/evaluate_fairseq.py
# --------------------------------------------------------------------------- #

MODES = ("all", "singletoken", "completion")


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="evaluate_fairseq.py",
        description="Evaluate fairseq checkpoints of gpt2_pretrained models (fairseq-train --task "
                    "gpt2_language_modeling) on one split: single-token metrics, completions "
                    "(greedy, top-k, top-p or beam search), predictions and targets, as JSON "
                    "files named like run_gpt2.py's results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    which = parser.add_argument_group("checkpoints (--checkpoint, or --model-path with --ckpt)")
    which.add_argument("--checkpoint", "--path", dest="checkpoint", nargs="+", default=None,
                       help="fairseq checkpoint file(s)")
    which.add_argument("--model-path", default=None,
                       help="a fairseq save directory; --ckpt picks the checkpoints in it")
    which.add_argument("--ckpt", choices=("best", "last", "all", "step", "epoch"), default="best")
    which.add_argument("--ckpt-step", default=None, help="N of checkpoint_*_N.pt (--ckpt step)")
    which.add_argument("--ckpt-epoch", default=None, help="N of checkpointN.pt (--ckpt epoch)")
    add("--data", "--data-dir", dest="data", default=None,
        help="data folder (.pt splits or a data-bin); default: the one the checkpoint was trained on")
    add("--eval-split", "--data-split", dest="eval_split", choices=("train", "valid", "test"),
        default="valid")
    add("--mode", "--eval-mode", dest="mode", choices=MODES, default="all")
    add("--output-dir", "--save-path", dest="output_dir", required=True,
        help="where the result files go")
    add("--model-name", default=None,
        help="name in the result file names; default: FOLDER-STEM of each checkpoint "
             "(e.g. run1-checkpoint_best)")
    add("--batch-size-singletoken", type=int, default=1024,
        help="tokens per chunk in single-token evaluation (chunks of N + 1), as run_gpt2.py")
    add("--batch-size-completion", type=int, default=300,
        help="tokens per chunk in completion evaluation (chunks of N + 1, cut into prefixes)")
    add("--prefix-length", "--data-prefix-length", dest="prefix_length", type=int, default=50)
    add("--continuation-length", "--completion-length", dest="continuation_length", type=int,
        default=100, help="generated tokens per prefix")
    add("--top-k", "--topk", dest="top_k", type=int, default=1,
        help="1 with --top-p 0 is greedy; > 1 samples among the k most likely")
    add("--top-p", "--topp", dest="top_p", type=float, default=0.0, help="nucleus sampling if > 0")
    add("--beam-size", type=int, default=1,
        help="beam search (fairseq's SequenceGenerator) when > 1; needs --top-k 1 --top-p 0")
    add("--beam-ngram-block", type=int, default=0,
        help="with beam search: no n-gram of this size repeats (0: off)")
    add("--completion-batch-size", type=int, default=None,
        help="prefixes continued together; default: the prefixes of one chunk, as run_gpt2.py "
             "(sampled results then match the driver's for the same --seed)")
    add("--seed", type=int, default=42, help="seed of top-k / top-p sampling")
    add("--tokenizer", default=None,
        help="tokenizer (hub name or folder) that decodes completions; default: the one the "
             "checkpoint was trained with (its --hf-tokenizer or --pretrained-model)")
    add("--device", default=None, help="cpu, cuda or cuda:N; default: cuda when available")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_args(args) -> None:
    _require((args.checkpoint is None) != (args.model_path is None),
             "give either --checkpoint FILE(s) or --model-path DIR (with --ckpt)")
    for name in ("batch_size_singletoken", "batch_size_completion", "prefix_length",
                 "continuation_length", "beam_size"):
        value = getattr(args, name)
        _require(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    _require(args.prefix_length <= args.batch_size_completion,
             f"--prefix-length {args.prefix_length} must be shorter than the completion chunk of "
             f"--batch-size-completion {args.batch_size_completion} + 1 tokens")
    _require(args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}")
    _require(0.0 <= args.top_p <= 1.0, f"--top-p must be between 0 and 1, got {args.top_p}")
    _require(args.beam_ngram_block >= 0, f"--beam-ngram-block must be >= 0, got {args.beam_ngram_block}")
    if args.beam_size > 1:
        _require(args.top_k == 1 and args.top_p == 0.0,
                 "beam search (--beam-size > 1) needs --top-k 1 and --top-p 0")
    else:
        _require(args.beam_ngram_block == 0, "--beam-ngram-block needs --beam-size > 1")
    if args.completion_batch_size is not None:
        _require(args.completion_batch_size >= 1,
                 f"--completion-batch-size must be at least 1, got {args.completion_batch_size}")


def default_model_name(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser().absolute()
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


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


def run_evaluation(args) -> list[str]:
    """Evaluate every selected checkpoint; returns the files written."""
    from ..generation import is_greedy
    from ..metrics import CompletionMetrics
    from ..tokenization import load_tokenizer

    checkpoints = args.checkpoint or find_checkpoints(args.model_path, args.ckpt, args.ckpt_step,
                                                      args.ckpt_epoch)
    if args.model_name and len(checkpoints) > 1:
        raise UserError("--model-name names one checkpoint; leave it out to name several by file")
    device = _device(args.device)
    progress = not args.no_progress
    singletoken = args.mode in ("all", "singletoken")
    completion = args.mode in ("all", "completion")
    written: list[str] = []
    for checkpoint in checkpoints:
        loaded = load_checkpoint(checkpoint, data=args.data, device=device)
        positions = int(loaded.model.max_positions())
        if positions < int(1e6):
            if singletoken:
                _require(args.batch_size_singletoken <= positions,
                         f"--batch-size-singletoken {args.batch_size_singletoken} is longer than the "
                         f"model's {positions} positions")
            if completion:
                _require(args.prefix_length + args.continuation_length <= positions,
                         f"--prefix-length + --continuation-length = "
                         f"{args.prefix_length + args.continuation_length} exceeds the model's "
                         f"{positions} positions")
        tokenizer = None
        if completion:
            source = args.tokenizer or loaded.tokenizer_source
            _require(bool(source), "the checkpoint names no tokenizer; pass --tokenizer")
            try:
                tokenizer = load_tokenizer(os.path.expanduser(source))
            except UserError as exc:
                raise UserError(f"{exc} (the tokenizer that decodes completions; pass "
                                f"--tokenizer NAME_OR_FOLDER)") from None
        # Read the data before writing anything.
        prefixes = per_chunk = None
        if completion:
            prefixes, per_chunk = completion_prefixes(loaded, args.eval_split,
                                                      args.batch_size_completion, args.prefix_length)
        names = result_names(args.model_name or default_model_name(checkpoint), args.eval_split,
                             args.batch_size_singletoken, args.batch_size_completion,
                             args.prefix_length, args.continuation_length, args.top_k, args.top_p,
                             args.beam_size, args.beam_ngram_block)
        output_dir = Path(args.output_dir).expanduser()
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --output-dir {args.output_dir}: {exc.strerror or exc}") from None
        logger.info("evaluating %s (%s updates) on %s", checkpoint, loaded.num_updates, args.eval_split)
        if singletoken:
            metrics, predictions, targets = eval_singletoken(
                loaded, args.eval_split, args.batch_size_singletoken, device=device, progress=progress)
            logger.info("single-token metrics: %s", metrics)
            written += write_singletoken_results(output_dir, names, args.eval_split, metrics,
                                                 predictions, targets, loaded)
        if completion:
            batch_size = args.completion_batch_size or per_chunk
            if args.beam_size > 1:
                completions = beam_completions(
                    loaded, prefixes, continuation_length=args.continuation_length,
                    beam_size=args.beam_size, ngram_block=args.beam_ngram_block,
                    batch_size=batch_size, device=device, progress=progress)
                decoding = {"beam_size": args.beam_size, "beam_ngram_block": args.beam_ngram_block}
            else:
                completions = sampled_completions(
                    loaded, prefixes, continuation_length=args.continuation_length,
                    top_k=args.top_k, top_p=args.top_p, batch_size=batch_size, seed=args.seed,
                    device=device, progress=progress)
                decoding = ({"greedy": True} if is_greedy(args.top_k, args.top_p)
                            else {"top_k": args.top_k, "top_p": args.top_p, "seed": args.seed})
            decoding.update(prefix_length=args.prefix_length,
                            continuation_length=args.continuation_length,
                            batch_size_completion=args.batch_size_completion)
            completion_metrics = CompletionMetrics(tokenizer, args.prefix_length)
            completion_metrics.update(completions)
            report = completion_metrics.report(args.eval_split)
            logger.info("completion metrics: %s %s uniq %d", report["bpe_metrics"],
                        report["word_metrics"], report["uniq"])
            written.append(write_completion_result(output_dir, names, report, completions, decoding,
                                                   loaded))
    return written
