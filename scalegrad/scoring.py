"""The scorer behind ``scalegrad-score``: anyone's generations (and prefixes and
references) read from plain text, JSONL or the drivers' completion result files,
scored with :mod:`scalegrad.text_metrics` (``docs/metrics-2022.md``, "The scorer").

:func:`read_texts` and :func:`read_inputs` read the files (every malformed line is a
:class:`UserError` naming the file and line), :func:`score_files` computes and writes
the JSON (atomically, nothing on an error), :func:`render_scores` the short table.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import UserError
from .io import write_json
from .text_metrics import GENERATION_COLUMNS, TextMetricOptions, score_samples

logger = logging.getLogger(__name__)

__all__ = ["ScorerInputs", "read_texts", "read_result_file", "read_inputs", "score_files",
           "render_scores"]

#: JSONL keys of one text (the first present is taken), and of several samples.
TEXT_KEYS = {"generations": ("continuation", "generation", "text"),
             "prefixes": ("prefix", "text"), "references": ("reference", "text")}
SAMPLE_KEYS = ("continuations", "generations")


@dataclass
class ScorerInputs:
    """``samples[s][i]``: sample ``s`` of prefix ``i``; prefixes and references aligned
    with the prefixes (or None)."""

    samples: list[list[str]]
    prefixes: list[str] | None = None
    references: list[str] | None = None


def _lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            raise UserError(f"{path} line {number}: not UTF-8 text") from None
    return out


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def read_texts(path, kind: str = "generations") -> dict:
    """One file of ``kind`` (``generations``, ``prefixes`` or ``references``):

    * ``*.jsonl``: one JSON value a line: a string, or an object with the text under
      ``continuation`` / ``generation`` / ``text`` (``prefix`` / ``reference`` for
      those kinds); a generations object may hold several samples as a list under
      ``continuations`` (every line the same number) and its ``prefix`` and
      ``reference``;
    * anything else: plain text, one text a line (``\\n`` inside a text needs JSONL).

    Returns ``{"samples": [[...], ...]}`` (generations) or ``{"texts": [...]}``, plus
    the ``prefixes`` / ``references`` a generations JSONL carried.
    """
    path = Path(path)
    lines = _lines(path)
    if not _is_jsonl(path):
        return {"samples": [lines]} if kind == "generations" else {"texts": lines}
    texts, samples, prefixes, references = [], [], [], []
    for number, line in enumerate(lines, 1):
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if isinstance(value, str):
            texts.append(value)
            continue
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a JSON string or object, got "
                            f"{type(value).__name__}")
        if kind == "generations":
            prefixes.append(value.get("prefix"))
            references.append(value.get("reference"))
            many = next((value[k] for k in SAMPLE_KEYS if k in value), None)
            if many is not None:
                if not isinstance(many, list) or not many or not all(isinstance(t, str)
                                                                     for t in many):
                    raise UserError(f"{where}: continuations must be a non-empty list of "
                                    f"strings")
                if samples and len(many) != len(samples[0]):
                    raise UserError(f"{where}: {len(many)} continuations, the lines before "
                                    f"have {len(samples[0])}")
                samples.append(many)
                continue
        text = next((value[k] for k in TEXT_KEYS[kind] if k in value), None)
        if not isinstance(text, str):
            keys = " / ".join(TEXT_KEYS[kind] + (SAMPLE_KEYS if kind == "generations" else ()))
            raise UserError(f"{where}: no text (a string under {keys})")
        texts.append(text)
    if kind != "generations":
        return {"texts": texts}
    if samples and texts:
        raise UserError(f"{path}: mixes lines with one continuation and lines with a list")
    out = {"samples": [list(s) for s in zip(*samples)] if samples else [texts]}
    for key, values in (("prefixes", prefixes), ("references", references)):
        given = [v for v in values if v is not None]
        if given and len(given) != len(values):
            raise UserError(f"{path}: some lines have a {key[:-1]} and others do not")
        if given:
            if not all(isinstance(v, str) for v in given):
                raise UserError(f"{path}: every {key[:-1]} must be a string")
            out[key] = given
    return out


def read_result_file(path, tokenizer=None) -> dict:
    """A driver's ``completion__*.json``: ``continuations`` (a list of texts, or one
    list per sample), ``prefixes`` and ``references`` (``docs/metrics-2022.md``,
    "Result layout"). A file with only ``completions`` (prefix and continuation
    decoded together, as the drivers wrote them before) is split with ``tokenizer``
    (the run's): each completion re-encoded, its first ``pfl`` ids (from the file
    name) the prefix, the rest the continuation as the drivers extract it; without
    a tokenizer a :class:`UserError` says so."""
    path = Path(path)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the result file {path}: {exc}") from None
    if not isinstance(result, dict):
        raise UserError(f"{path}: not a completion result file (a JSON object)")
    continuations = result.get("continuations")
    if continuations is None:
        if "completions" in result:
            return _split_completions(path, result["completions"], tokenizer)
        raise UserError(f"{path}: not a completion result file (no continuations)")
    if continuations and all(isinstance(c, str) for c in continuations):
        samples = [continuations]
    elif continuations and all(isinstance(c, list) and all(isinstance(t, str) for t in c)
                               for c in continuations):
        samples = continuations
    else:
        raise UserError(f"{path}: continuations must be a non-empty list of texts (or of "
                        f"lists of texts, one per sample)")
    out = {"samples": samples}
    for key in ("prefixes", "references"):
        if result.get(key) is not None:
            out[key] = result[key]
    return out


def _split_completions(path: Path, completions, tokenizer) -> dict:
    from .metrics import continuation_text, decode_text

    if tokenizer is None:
        raise UserError(f"{path} holds only whole completions (prefix and continuation "
                        f"decoded together): give --tokenizer (the run's) to split them, or "
                        f"re-run the evaluation with this version")
    match = re.search(r"__pfl_(\d+)__", path.name)
    if not match:
        raise UserError(f"{path}: the file name names no prefix length (__pfl_N__) to split "
                        f"its completions at")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise UserError(f"{path}: completions must be a list of texts")
    prefix_length = int(match.group(1))
    logger.warning("%s has no continuations: each completion re-encoded with the tokenizer "
                   "and split after %d tokens (re-encoding can shift the split by a token)",
                   path, prefix_length)
    prefixes, continuations = [], []
    for text in completions:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        prefixes.append(decode_text(tokenizer, ids[:prefix_length]))
        continuations.append(continuation_text(tokenizer, ids, prefix_length))
    return {"samples": [continuations], "prefixes": prefixes}


def read_inputs(generations: Sequence[str], prefixes: str | None = None,
                references: str | None = None, tokenizer=None) -> ScorerInputs:
    """The scorer's inputs: each ``generations`` file one sample set (a ``.json`` file
    is a driver's completion result), ``prefixes`` / ``references`` files (or those the
    generations file carried); sample sets of different lengths are an error."""
    samples: list[list[str]] = []
    carried: dict = {}
    for name in generations:
        path = Path(name)
        part = (read_result_file(path, tokenizer) if path.suffix.lower() == ".json"
                else read_texts(path))
        samples += part["samples"]
        for key in ("prefixes", "references"):
            if key in part and key not in carried:
                carried[key] = part[key]
    lengths = {len(s) for s in samples}
    if len(lengths) > 1:
        raise UserError(f"the generation files give sample sets of different lengths "
                        f"({', '.join(map(str, sorted(lengths)))}): one continuation per prefix")
    inputs = ScorerInputs(samples, carried.get("prefixes"), carried.get("references"))
    if prefixes:
        inputs.prefixes = read_texts(prefixes, "prefixes")["texts"]
    if references:
        inputs.references = read_texts(references, "references")["texts"]
    count = len(samples[0]) if samples else 0
    for key, values in (("prefixes", inputs.prefixes), ("references", inputs.references)):
        if values is not None and len(values) != count:
            raise UserError(f"{len(values)} {key} but {count} generations: give one "
                            f"{key[:-1]} per generation")
    if count == 0:
        raise UserError("no generations to score (the file is empty)")
    return inputs


def score_files(generations: Sequence[str], output: str | None = None, *,
                prefixes: str | None = None, references: str | None = None,
                options: TextMetricOptions | None = None, tokenizer: str | None = None) -> dict:
    """Read, score (:func:`scalegrad.text_metrics.score_samples`) and, with ``output``,
    write the JSON atomically; returns the result (with ``inputs``: the file names).
    ``tokenizer`` (a name or folder) splits result files that hold only completions."""
    options = options or TextMetricOptions()
    if output and os.path.isdir(output):
        raise UserError(f"--output {output} is a folder; give a file name")
    loaded = None
    if tokenizer:
        from .tokenization import load_tokenizer

        loaded = load_tokenizer(os.path.expanduser(tokenizer))
    inputs = read_inputs(generations, prefixes, references, loaded)
    result = score_samples(inputs.prefixes, inputs.samples, inputs.references, options)
    result["inputs"] = {"generations": list(map(str, generations)), "prefixes": prefixes,
                        "references": references}
    if output:
        write_json(output, _finite(result), indent=2)
    return result


def _finite(value):
    """NaN and infinities as null: the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _fmt(value, std=None) -> str:
    if value is None:
        return "-"
    whole = isinstance(value, int) or float(value).is_integer()
    text = str(int(value)) if whole else f"{value:.3f}"
    return text if std is None else f"{text} +- {std:.3f}"


def render_scores(result: dict, fmt: str = "text") -> str:
    """The columns present, one row for the generations (mean +- std with several
    samples) and one for the human references."""
    rows = [("generations", result["metrics"], result.get("std"))]
    if "human" in result:
        rows.append(("human", result["human"], None))
    columns = [c for c in GENERATION_COLUMNS if any(c in values for _, values, _ in rows)]
    header = ["texts"] + columns
    body = [[name] + [_fmt(values.get(c), std.get(c) if std else None) for c in columns]
            for name, values, std in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [header] + body]
    note = (f"{result['num_prefixes']} prefixes, {result['num_samples']} sample set"
            f"{'s (mean +- std)' if result['num_samples'] > 1 else ''}")
    return "\n".join(lines) + "\n" + note + "\n"
