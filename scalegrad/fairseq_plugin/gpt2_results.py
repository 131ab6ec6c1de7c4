"""``evaluate_fairseq.py --result-format gpt2``: a ``gpt2_pretrained`` checkpoint
evaluated into result files named and shaped like ``run_gpt2.py``'s
(``singletoken__*.json``, ``completion__*.json``), so the two drivers can be
compared file for file and ``report_metrics.py`` reads both.

* single-token: chunks of ``--batch-size-single-prediction + 1`` ids (the task's
  blocks), the GPT-2 driver's metrics (same functions, same aggregation);
* completion: the prefixes of chunks of ``--batch-size-completion + 1`` ids,
  continued by the GPT-2 driver's own generation code (greedy, top-k, top-p,
  with the same seeding and batching), or by beam search (:mod:`.decoding`);
  the completion file name then ends in ``__beam_{B}__ngb_{N}``.

Beside them: ``predictions__*``, ``targets__*`` (ids per chunk) and
``metrics__*`` (``{split}/{metric}`` and ``checkpoint_step``), as JSON.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import UserError
from ..io import write_json
from .checkpoints import checkpoint_hf_config, checkpoint_tokenizer_source
from .decoding import beam_continuations
from .evaluation import progress_bar
from .loading import LoadedModel, load_blocks

logger = logging.getLogger(__name__)


def hf_config_dict(loaded: LoadedModel) -> dict:
    return checkpoint_hf_config({"cfg": loaded.state_cfg}).to_dict()


@torch.no_grad()
def eval_singletoken(loaded: LoadedModel, split: str, length: int, *, progress: bool = True):
    """``(metrics, predictions, targets)``: the GPT-2 driver's aggregated metrics
    over the chunks of ``length + 1`` ids, and per chunk the argmax and target ids."""
    from ..gpt2.evaluate import statistics_logging_output
    from ..metrics import aggregate_ranking_metrics, token_statistics

    dataset = load_blocks(loaded, split, length)
    device = loaded.device
    logging_outputs, predictions, targets = [], [], []
    bar = progress_bar(progress, len(dataset), "Single-token", "chunk")
    for index in range(len(dataset)):
        sample = dataset.collater([dataset[index]])
        net_output = loaded.model(**{k: v.to(device) for k, v in sample["net_input"].items()})
        logits = net_output[0][0].float()
        target = sample["target"][0].to(device)
        stats = token_statistics(logits, target)  # the GPT-2 driver's computation
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


def completion_prefixes(loaded: LoadedModel, split: str, length: int,
                        prefix_length: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(prefixes, prefixes per chunk, chunks)`` of the split's chunks of ``length + 1`` ids."""
    from ..data import make_prefixes

    chunks = load_blocks(loaded, split, length).chunks.long()
    prefixes = make_prefixes(chunks, prefix_length)
    return prefixes, prefixes.size(0) // max(chunks.size(0), 1), chunks


def sampled_completions(loaded: LoadedModel, prefixes: torch.Tensor, *, continuation_length: int,
                        top_k: int, top_p: float, batch_size: int, seed: int,
                        penalty_alpha: float | None = None,
                        progress: bool = True) -> list[list[int]]:
    """Greedy / top-k / top-p / contrastive search: the GPT-2 driver's own code,
    seeding and batching."""
    from ..gpt2.evaluate import generate_completions
    from ..gpt2.runtime import Runtime

    runtime = Runtime(device=loaded.device, progress=progress)
    return generate_completions(loaded.hf_model, prefixes, runtime,
                                continuation_length=continuation_length, top_k=top_k, top_p=top_p,
                                batch_size=batch_size, seed=seed, penalty_alpha=penalty_alpha)


def beam_completions(loaded: LoadedModel, prefixes: torch.Tensor, *, continuation_length: int,
                     beam_size: int, ngram_block: int = 0, batch_size: int,
                     progress: bool = True) -> list[list[int]]:
    dictionary = loaded.dictionary
    if dictionary.eos() >= dictionary.pad():
        raise UserError("beam search needs the model's end-of-text id, which its config does not "
                        "give (eos_token_id)")
    completions: list[list[int]] = []
    bar = progress_bar(progress, prefixes.size(0), "Beam search", "prefix")
    for start in range(0, prefixes.size(0), batch_size):
        batch = prefixes[start:start + batch_size].to(loaded.device)
        continuations = beam_continuations(loaded.model, dictionary, batch, continuation_length,
                                           beam_size=beam_size, ngram_block=ngram_block)
        completions += [row + c for row, c in zip(batch.tolist(), continuations)]
        if bar is not None:
            bar.update(batch.size(0))
    if bar is not None:
        bar.close()
    return completions


def result_names(model_name: str, split: str, bsz_singletoken: int, bsz_completion: int,
                 prefix_length: int, continuation_length: int, top_k: int, top_p: float,
                 beam_size: int = 1, ngram_block: int = 0,
                 penalty_alpha: float | None = None) -> dict:
    """File names of one evaluation: the GPT-2 driver's for the shared results,
    plus the extra outputs."""
    from ..gpt2.evaluate import completion_filename, singletoken_filename

    args = SimpleNamespace(model_name=model_name, eval_split=split,
                           batch_size_singletoken=bsz_singletoken,
                           batch_size_completion=bsz_completion, prefix_length=prefix_length,
                           continuation_length=continuation_length, top_k=top_k, top_p=top_p,
                           penalty_alpha=penalty_alpha)
    singletoken = singletoken_filename(args)
    completion = completion_filename(args)
    if beam_size > 1:
        completion = completion[:-len(".json")] + f"__beam_{beam_size}__ngb_{ngram_block}.json"
    stem = singletoken[len("singletoken__"):]
    return {"singletoken": singletoken, "predictions": "predictions__" + stem,
            "targets": "targets__" + stem, "metrics": "metrics__" + stem, "completion": completion}


def default_model_name(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser().absolute()
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def evaluate_gpt2_format(loaded: LoadedModel, args, output_dir: Path) -> list[str]:
    """One checkpoint, ``run_gpt2.py``-style files; returns the files written."""
    from ..data import human_continuations
    from ..gpt2.evaluate import completion_report, decoding_record, result_file_content
    from ..tokenization import load_tokenizer

    if not loaded.is_gpt2:
        raise UserError(f"--result-format gpt2 needs a gpt2_pretrained checkpoint; {loaded.path} "
                        f"is not one (leave the option out for the original's files)")
    singletoken = args.eval_mode in ("all", "singletoken")
    completion = args.eval_mode in ("all", "completion")
    checkpoint_info = {"path": loaded.path, "num_updates": loaded.num_updates}
    tokenizer = prefixes = per_chunk = chunks = None
    if completion:
        source = args.tokenizer or checkpoint_tokenizer_source({"cfg": loaded.state_cfg})
        if not source:
            raise UserError("the checkpoint names no tokenizer; pass --tokenizer")
        try:
            tokenizer = load_tokenizer(os.path.expanduser(source))
        except UserError as exc:
            raise UserError(f"{exc} (the tokenizer that decodes completions; pass "
                            f"--tokenizer NAME_OR_FOLDER)") from None
        prefixes, per_chunk, chunks = completion_prefixes(
            loaded, args.data_split, args.batch_size_completion, args.data_prefix_length)
    names = result_names(args.model_name or default_model_name(loaded.path), args.data_split,
                         args.batch_size_single_prediction, args.batch_size_completion,
                         args.data_prefix_length, args.completion_length, args.topk, args.topp,
                         args.beam_size, args.beam_ngram_block, args.penalty_alpha)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    progress = not args.no_progress
    if singletoken:
        metrics, predictions, targets = eval_singletoken(
            loaded, args.data_split, args.batch_size_single_prediction, progress=progress)
        logger.info("single-token metrics: %s", metrics)
        split = args.data_split
        files = {
            "singletoken": {"metrics": metrics, "config": hf_config_dict(loaded),
                            "checkpoint": checkpoint_info},
            "predictions": {"split": split, "predictions": predictions},
            "targets": {"split": split, "targets": targets},
            "metrics": {**{f"{split}/{k}": v for k, v in metrics.items()},
                        "checkpoint_step": loaded.num_updates},
        }
        for kind, content in files.items():
            write_json(output_dir / names[kind], content)
            written.append(str(output_dir / names[kind]))
    if completion:
        batch_size = args.completion_batch_size or per_chunk
        if args.beam_size > 1:
            completions = beam_completions(
                loaded, prefixes, continuation_length=args.completion_length,
                beam_size=args.beam_size, ngram_block=args.beam_ngram_block,
                batch_size=batch_size, progress=progress)
            decoding = {"beam_size": args.beam_size, "beam_ngram_block": args.beam_ngram_block}
        else:
            completions = sampled_completions(
                loaded, prefixes, continuation_length=args.completion_length, top_k=args.topk,
                top_p=args.topp, batch_size=batch_size, seed=args.seed,
                penalty_alpha=args.penalty_alpha, progress=progress)
            decoding = decoding_record(args.topk, args.topp, args.penalty_alpha, [args.seed])
        decoding.update(prefix_length=args.data_prefix_length,
                        continuation_length=args.completion_length,
                        batch_size_completion=args.batch_size_completion)
        report = completion_report(
            tokenizer, [completions], args.data_prefix_length, args.data_split, seeds=[args.seed],
            decoding=decoding, references=human_continuations(chunks, args.data_prefix_length,
                                                              args.completion_length))
        logger.info("completion metrics: %s %s uniq %d", report["bpe_metrics"],
                    report["word_metrics"], report["uniq"])
        path = output_dir / names["completion"]
        write_json(path, result_file_content(report, hf_config_dict(loaded),
                                             completion_ids=completions, decoding=decoding,
                                             checkpoint=checkpoint_info))
        written.append(str(path))
    return written
