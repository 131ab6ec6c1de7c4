"""The original fairseq evaluation script's output files (``docs/reference.md``,
fairseq evaluation), written atomically into ``--save-path``:

* ``completions_{SUFFIX}.txt``: per line, prefix + continuation as dictionary
  symbols joined by single spaces;
* ``single_token_predictions_{SUFFIX}.txt`` and ``targets_{SUFFIX}.txt``: per
  block, the predicted / target symbols;
* ``metrics_{SUFFIX}.json``: ``{split}/{metric}`` for every single-token metric
  plus ``checkpoint_step`` (the original wrote this dictionary as a pickle,
  ``metrics_{SUFFIX}.pkl``);
* ``text_metrics_{SUFFIX}.json`` (not in the original): the 2022 papers' columns
  of the completions (rep-2/3/4, diversity, gen-length, ...) and of the true
  continuations (``human``), on the dictionary symbols as whitespace tokens
  (:func:`scalegrad.text_metrics.score_samples`, ``docs/metrics-2022.md``).

``SUFFIX`` is the original's
``_{model}__st_{step}__spl_{split}__pfx_{prefix}__cmpl_{completion}__bs_cmpl_{..}__bs_sprd_{..}__bms_{beam}__bnb_{block}__tpk_{k}__tpp_{p}__sttpk_{..}__sttpp_{..}__ckst_{..}__ckep_{..}__ckpt_{..}``,
unset values printed as ``None``; ``{model}`` is the base name of ``--model-path``;
``__alpha_{A}`` is appended for contrastive search (``--penalty-alpha``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_path, write_json

FILE_KINDS = ("completions", "single_token_predictions", "targets", "metrics", "text_metrics")


def filename_suffix(*, model: str, step, split: str, prefix_length: int, completion_length: int,
                    batch_size_completions: int, batch_size_single_prediction: int, beam_size: int,
                    beam_ngram_block: int, topk: int, topp: float, singletoken_topk: int,
                    singletoken_topp: float, ckpt_step, ckpt_epoch, ckpt: str) -> str:
    """The original's file-name suffix (values formatted as Python's ``format`` does)."""
    return (f"_{model}__st_{step}__spl_{split}__pfx_{prefix_length}__cmpl_{completion_length}"
            f"__bs_cmpl_{batch_size_completions}__bs_sprd_{batch_size_single_prediction}"
            f"__bms_{beam_size}__bnb_{beam_ngram_block}__tpk_{topk}__tpp_{topp}"
            f"__sttpk_{singletoken_topk}__sttpp_{singletoken_topp}__ckst_{ckpt_step}"
            f"__ckep_{ckpt_epoch}__ckpt_{ckpt}")


def model_name(model_path) -> str:
    """``{model}`` of the suffix: the base name of the checkpoint folder."""
    return os.path.basename(os.path.normpath(os.path.expanduser(str(model_path))))


def result_path(save_path, kind: str, suffix: str) -> Path:
    extension = "json" if kind in ("metrics", "text_metrics") else "txt"
    return Path(save_path) / f"{kind}_{suffix}.{extension}"


def symbol_lines(dictionary, rows) -> list[str]:
    """Each row of ids as its dictionary symbols joined by single spaces."""
    return [" ".join(dictionary[i] for i in row) for row in rows]


def write_lines(path, lines) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
    return str(path)


def write_completions(save_path, suffix: str, dictionary, completions) -> str:
    return write_lines(result_path(save_path, "completions", suffix),
                       symbol_lines(dictionary, completions))


def completion_text_metrics(dictionary, completions, references, prefix_length: int) -> dict:
    """The papers' columns of the completions (prefix + continuation ids) and of
    ``references`` (the true continuation ids), as symbol texts."""
    from ..text_metrics import score_samples

    prefixes = symbol_lines(dictionary, [row[:prefix_length] for row in completions])
    continuations = symbol_lines(dictionary, [row[prefix_length:] for row in completions])
    return score_samples(prefixes, [continuations], symbol_lines(dictionary, references))


def write_text_metrics(save_path, suffix: str, text_metrics: dict) -> str:
    path = result_path(save_path, "text_metrics", suffix)
    write_json(path, text_metrics, indent=1)
    return str(path)


def write_single_token_results(save_path, suffix: str, dictionary, split: str, metrics: dict,
                               predictions, targets, step) -> list[str]:
    """The metrics, predictions and targets files of one single-token pass."""
    stored = {f"{split}/{name}": value for name, value in metrics.items()}
    stored["checkpoint_step"] = step
    metrics_path = result_path(save_path, "metrics", suffix)
    write_json(metrics_path, stored, indent=1)
    return [
        str(metrics_path),
        write_lines(result_path(save_path, "single_token_predictions", suffix),
                    symbol_lines(dictionary, predictions)),
        write_lines(result_path(save_path, "targets", suffix), symbol_lines(dictionary, targets)),
    ]
