"""Result files -> the paper's table (and plots).

Two kinds of result files, one table with the columns of the original report,
``seq-rep-1, seq-rep-4, uniq-seq, ppl, acc, rep, wrep, uniq``:

* :func:`collect_rows`: the JSON files of ``scripts/run_gpt2.py`` (and of
  ``evaluate_fairseq.py --result-format gpt2``):
  ``singletoken__{model}__spl_{split}__bsz_{n}[_{step}].json`` and
  ``completion__{model}__spl_{split}__topk_{k}__topp_{p}__pfl_{l}__cnl_{c}[__beam_{B}__ngb_{N}].json``;
  one row per run and decoding setting. uniq-seq is the number of distinct
  space-separated words of the decoded continuations.
* :func:`collect_original_rows`: the files of the original fairseq evaluation
  script (``scripts/evaluate_fairseq.py``), read as the original report script
  did (``docs/reference.md``, fairseq evaluation and report): files named
  ``{kind}__{model}__{key}_{value}__...`` whose settings are parsed from the
  name; one row per model and setting (step, split, beam size, beam block,
  top-k, top-p). Here uniq-seq is the number of distinct continuation *tokens*
  (dictionary symbols) and uniq the number of distinct single-token
  predictions; the human row takes seq-rep-N from the targets cut into pieces
  of the completion length, rep from the metrics and uniq-seq / uniq from the
  distinct target tokens.

Completion results that carry ``text_metrics`` add the 2022 papers' columns (rep-2/3/4,
diversity, gen-length, MAUVE, coherence; mean +- std over samples) and their human
row: :mod:`scalegrad.report_2022`, ``docs/metrics-2022.md``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .report_2022 import TEXT_COLUMNS, human_text_values, text_metric_values

COLUMNS = ["seq-rep-1", "seq-rep-4", "uniq-seq", "ppl", "acc", "rep", "wrep", "uniq"]

SINGLETOKEN_RE = re.compile(
    r"^singletoken__(?P<model>.+?)__spl_(?P<split>[^_]+)__bsz_(?P<bsz>\d+)(?:_(?P<step>\d+))?\.json$")
COMPLETION_RE = re.compile(
    r"^completion__(?P<model>.+?)__spl_(?P<split>[^_]+)__topk_(?P<topk>[^_]+)__topp_(?P<topp>[^_]+)"
    r"__pfl_(?P<pfl>\d+)__cnl_(?P<cnl>\d+)(?:__beam_(?P<beam>\d+)__ngb_(?P<ngb>\d+))?"
    r"(?:__alpha_(?P<alpha>[^_]+))?(?:__samples_(?P<samples>\d+))?\.json$")


@dataclass
class Row:
    run: str
    model: str
    split: str
    decoding: str
    values: dict = field(default_factory=dict)
    source: str = "gpt2"  # "original": read from the original evaluation script's files
    std: dict = field(default_factory=dict)  # standard deviations over samples (TEXT_COLUMNS)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read result file {path}: {exc}") from None


def _read_result(path: Path, *parts: str) -> dict:
    """A result file whose ``parts`` are JSON objects (else one :class:`UserError`)."""
    result = _read_json(path)
    missing = [part for part in parts if not isinstance(result, dict)
               or not isinstance(result.get(part), dict)]
    if missing:
        raise UserError(f"result file {path} holds no {missing[0]!r} object (not a result file "
                        f"of scalegrad-run-gpt2 or scalegrad-evaluate-fairseq --result-format "
                        f"gpt2?); remove it or move it out of the folder")
    return result


def _decoding_name(topk: str, topp: str, beam: str | None = None, ngram_block: str | None = None,
                   alpha: str | None = None, samples: str | None = None) -> str:
    if alpha is not None:  # --penalty-alpha: contrastive search (docs/contrastive-search.md)
        return f"contrastive, alpha {alpha}, top-k {topk}"
    if samples is not None and int(samples) > 1:  # --num-samples
        return f"{_decoding_name(topk, topp, beam, ngram_block)}, {samples} samples"
    if beam is not None and int(beam) > 1:  # evaluate_fairseq.py's beam search
        block = f", {ngram_block}-gram block" if ngram_block and int(ngram_block) > 0 else ""
        return f"beam {beam}{block}"
    if float(topp) == 0 and int(float(topk)) == 1:
        return "greedy"
    parts = []
    if int(float(topk)) > 1:
        parts.append(f"top-k {topk}")
    if float(topp) > 0:
        parts.append(f"top-p {topp}")
    return ", ".join(parts) or f"top-k {topk}"


def singletoken_values(metrics: dict) -> dict:
    """The paper's token-level columns from a single-token result's ``metrics``."""
    return {
        "ppl": metrics.get("ppl"),
        "acc": metrics.get("hits_at_1"),
        "rep": metrics.get("repeat_at_1/128"),
        "wrep": metrics.get("wrong_repeat_at_1/128"),
        "uniq": metrics.get("uniq"),
    }


def completion_values(result: dict, split: str, view: str = "bpe") -> dict:
    """The paper's sequence-level columns from a completion result."""
    metrics = result.get(f"{view}_metrics", {})
    return {
        "seq-rep-1": metrics.get(f"{view}_{split}/pct_repeat_1grams"),
        "seq-rep-4": metrics.get(f"{view}_{split}/pct_repeat_4grams"),
        "uniq-seq": result.get("uniq"),
    }


def collect_rows(run_dirs, names=None, *, view: str = "bpe", human: bool = True) -> list[Row]:
    """One row per (run, model, split, decoding); a ``human`` row per split
    with the reference values that have one (rep and uniq of the human text)."""
    names = list(names) if names else [Path(d).name for d in run_dirs]
    if len(names) != len(run_dirs):
        raise UserError(f"--names gives {len(names)} names for {len(run_dirs)} result directories")
    rows: list[Row] = []
    human_rows: dict[str, Row] = {}
    text_human: dict[str, dict] = {}  # the references' 2022 columns, the first file's per split
    for run_dir, run_name in zip(run_dirs, names):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"result directory {run_dir} does not exist")
        singletoken = {}
        for path in sorted(run_dir.glob("singletoken__*.json")):
            m = SINGLETOKEN_RE.match(path.name)
            if m and m["step"] is None:
                singletoken[(m["model"], m["split"])] = _read_result(path, "metrics")["metrics"]
        completions = []
        for path in sorted(run_dir.glob("completion__*.json")):
            m = COMPLETION_RE.match(path.name)
            if m:
                completions.append((m, _read_result(path, f"{view}_metrics")))
        if not singletoken and not completions:
            raise UserError(f"no result files (singletoken__*.json, completion__*.json) in {run_dir}")
        keys_done = set()
        for m, result in completions:
            key = (m["model"], m["split"])
            row = Row(run_name, m["model"], m["split"], _decoding_name(m["topk"], m["topp"], m["beam"], m["ngb"],
                                                                m["alpha"], m["samples"]))
            row.values.update(completion_values(result, m["split"], view))
            text_values, row.std = text_metric_values(result)  # docs/metrics-2022.md
            row.values.update(text_values)
            if human:
                for column, value in human_text_values(result).items():
                    text_human.setdefault(m["split"], {}).setdefault(column, value)
            if key in singletoken:
                row.values.update(singletoken_values(singletoken[key]))
            rows.append(row)
            keys_done.add(key)
        for key, metrics in singletoken.items():
            if key not in keys_done:
                row = Row(run_name, key[0], key[1], "-")
                row.values.update(singletoken_values(metrics))
                rows.append(row)
            if human and key[1] not in human_rows:
                human_rows[key[1]] = Row("human", "-", key[1], "-", {
                    "rep": metrics.get("human_repeat_at_1/128"),
                    "uniq": metrics.get("human_uniq"),
                })
    for split, values in text_human.items():
        human_rows.setdefault(split, Row("human", "-", split, "-")).values.update(values)
    return rows + list(human_rows.values())


# --------------------------------------------------------------------------- #
# The original evaluation script's files (evaluate_fairseq.py)
# --------------------------------------------------------------------------- #

ORIGINAL_KINDS = {"completions": ".txt", "single_token_predictions": ".txt", "targets": ".txt",
                  "metrics": ".json"}


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_original_name(name: str) -> tuple[str, str, dict]:
    """``(kind, model, settings)`` of a file name ``{kind}__{model}__{key}_{value}__...``:
    each ``key_value`` part split at its last underscore, numbers parsed."""
    parts = ".".join(name.split(".")[:-1]).split("__")
    settings = {}
    for part in parts[2:]:
        key, _, value = part.rpartition("_")
        settings[key] = _parse_value(value)
    return parts[0], parts[1] if len(parts) > 1 else "", settings


def _lines(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read result file {path}: {exc}") from None


def original_file_metrics(path: Path, kind: str, settings: dict) -> dict:
    """What the original report takes from one file (keys prefixed by the split)."""
    from .metrics import NgramMetrics

    split = settings.get("spl")
    prefix_length, completion_length = settings.get("pfx"), settings.get("cmpl")
    if kind == "metrics":
        return _read_json(path)
    if not isinstance(prefix_length, int) or not isinstance(completion_length, int):
        raise UserError(f"{path.name} names no pfx_N and cmpl_N settings")
    if kind == "completions":
        continuations = []
        for number, tokens in enumerate(_lines(path), 1):
            if len(tokens) != prefix_length + completion_length:
                raise UserError(f"{path} line {number} has {len(tokens)} tokens, not prefix + "
                                f"completion = {prefix_length + completion_length}")
            continuations.append(tokens[prefix_length:])
        ngrams = NgramMetrics(pad=None)
        ngrams.update(continuations)
        return {**ngrams.report(split),
                f"{split}/num_uniq_compl": len({t for tokens in continuations for t in tokens})}
    if kind == "targets":
        lines = _lines(path)
        pieces = [tokens[i * completion_length:(i + 1) * completion_length]
                  for tokens in lines for i in range(len(tokens) // completion_length)]
        ngrams = NgramMetrics(pad=None)
        ngrams.update(pieces)
        return {**ngrams.report(f"{split}_human"),
                f"{split}/num_uniq_target": len({t for tokens in lines for t in tokens})}
    return {f"{split}/num_uniq_singletok": len({t for tokens in _lines(path) for t in tokens})}


SHOWN_SETTINGS = {"model_name", "st", "spl", "tpk", "tpp", "bms", "bnb", "alpha"}


def collect_original_rows(eval_dirs, model_names=None, *, human: bool = True) -> list[Row]:
    """Rows of the original evaluation files in ``eval_dirs`` (see the module doc).

    For each name in ``model_names`` (default: every model found) the files matching
    ``*__{name}*__spl_*__*`` are read and merged per setting, as the original
    report did; ``human`` adds one reference row per split that has targets.
    """
    eval_dirs = [Path(d) for d in eval_dirs]
    for directory in eval_dirs:
        if not directory.is_dir():
            raise UserError(f"evaluation directory {directory} does not exist")
    files = [path for directory in eval_dirs for path in sorted(directory.glob("*__*__spl_*__*"))
             if ORIGINAL_KINDS.get(parse_original_name(path.name)[0]) == path.suffix]
    every_model = model_names is None
    if every_model and not files:
        raise UserError(f"no evaluation files (completions__*, single_token_predictions__*, "
                        f"targets__*, metrics__* of scalegrad-evaluate-fairseq) in "
                        f"{', '.join(map(str, eval_dirs))}")
    if every_model:
        model_names = sorted({parse_original_name(path.name)[1] for path in files})
    rows: list[Row] = []
    human_rows: dict[str, Row] = {}
    for name in model_names:
        merged: dict[tuple, dict] = {}
        for path in files:
            if not path.match(f"*__{name}*__spl_*__*"):
                continue
            kind, model, settings = parse_original_name(path.name)
            if every_model and model != name:  # "sg" must not take in the files of "sg0.2" too
                continue
            key = tuple(sorted({**settings, "model_name": model}.items(), key=lambda kv: kv[0]))
            merged.setdefault(key, {}).update(original_file_metrics(path, kind, settings))
        if not merged:
            raise UserError(f"no evaluation files of model {name!r} (*__{name}*__spl_*__*) in "
                            f"{', '.join(map(str, eval_dirs))}")
        # Settings that tell rows apart beyond those shown in their own columns.
        varying = sorted({k for key in merged for k, v in key
                          if k not in SHOWN_SETTINGS and len({dict(o).get(k) for o in merged}) > 1})
        for key, values in merged.items():
            settings = dict(key)
            split = settings.get("spl")
            decoding = _decoding_name(str(settings.get("tpk", 1)), str(settings.get("tpp", 0.0)),
                                      str(settings.get("bms", 1)), str(settings.get("bnb", 0)),
                                      None if "alpha" not in settings else str(settings["alpha"]))
            label = "; ".join([f"step {settings.get('st')}"] + [f"{k} {settings.get(k)}" for k in varying])
            rows.append(Row(name, f"{settings['model_name']} ({label})", str(split),
                            decoding, original_values(values, split), source="original"))
            if human and f"{split}/num_uniq_target" in values and split not in human_rows:
                human_rows[split] = Row("human", "-", str(split), "-",
                                        original_human_values(values, split), source="original")
    return rows + list(human_rows.values())


def original_values(values: dict, split) -> dict:
    """The table's columns from one merged setting, as the original report took them."""
    columns = {"seq-rep-1": "pct_repeat_1grams", "seq-rep-4": "pct_repeat_4grams",
               "uniq-seq": "num_uniq_compl", "ppl": "ppl", "acc": "hits_at_1",
               "rep": "repeat_at_1/128", "wrep": "wrong_repeat_at_1/128",
               "uniq": "num_uniq_singletok"}
    return {column: values.get(f"{split}/{key}") for column, key in columns.items()}


def original_human_values(values: dict, split) -> dict:
    uniq = values.get(f"{split}/num_uniq_target")
    return {"seq-rep-1": values.get(f"{split}_human/pct_repeat_1grams"),
            "seq-rep-4": values.get(f"{split}_human/pct_repeat_4grams"), "uniq-seq": uniq,
            "rep": values.get(f"{split}/human_repeat_at_1/128"), "uniq": uniq}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not float(value).is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


#: The label columns of every row, before the metric columns.
LABELS = ("run", "model", "split", "decoding")


def _table(rows: list[Row], fmt: str = "text", columns=COLUMNS,
           labels=LABELS) -> tuple[list[str], list[list[str]]]:
    """``labels`` (Row attributes), ``columns`` (today's by default), then each of the 2022
    papers' columns some row has: "mean +- std" with several samples (CSV: the std in a
    column of its own)."""
    extra = [c for c in TEXT_COLUMNS if c not in columns and any(r.values.get(c) is not None for r in rows)]
    header = list(labels) + list(columns)
    body = [[getattr(r, label) for label in labels] + [_fmt(r.values.get(c)) for c in columns]
            for r in rows]
    for column in extra:
        with_std = any(column in r.std for r in rows)
        if fmt == "csv":
            header += [column] + ([f"{column} std"] if with_std else [])
        else:
            header.append(column)
        for r, line in zip(rows, body):
            value, std = _fmt(r.values.get(column)), r.std.get(column)
            if fmt == "csv":
                line += [value] + ([_fmt(std)] if with_std else [])
            else:
                line.append(value if std is None else f"{value} +- {_fmt(float(std))}")
    return header, body


ORIGINAL_LEGEND = (
    "Rows from evaluate_fairseq.py's files (the original report): uniq-seq = distinct "
    "continuation tokens (dictionary symbols), uniq = distinct single-token predictions; "
    "human: seq-rep-N of the targets cut into completion-length pieces, uniq-seq = uniq = "
    "distinct target tokens. Rows from run_gpt2.py's files: uniq-seq = distinct words of the "
    "decoded continuations.")


def render(rows: list[Row], fmt: str = "text", *, columns=COLUMNS, labels=LABELS) -> str:
    """The table as text, CSV or Markdown (``labels``: the :class:`Row` attributes shown
    first, ``columns``: the keys of ``Row.values`` after them); text and Markdown add a
    legend of the uniq definitions when a row comes from the original evaluation files."""
    table = _render_table(rows, fmt, columns, labels)
    if fmt != "csv" and any(r.source == "original" for r in rows):
        table += "\n" + ORIGINAL_LEGEND + "\n"
    return table


def _render_table(rows: list[Row], fmt: str, columns=COLUMNS, labels=LABELS) -> str:
    header, body = _table(rows, fmt, columns, labels)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
        return out.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines) + "\n"


def validation_curve(train_dir) -> dict[str, list[tuple[int, float]]]:
    """``{split: [(step, ppl), ...]}`` from the ``singletoken__..._{step}.json``
    files a training run writes at each validation."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for path in Path(train_dir).glob("singletoken__*.json"):
        m = SINGLETOKEN_RE.match(path.name)
        if m and m["step"] is not None:
            ppl = _read_result(path, "metrics")["metrics"].get("ppl")
            curves.setdefault(m["split"], []).append((int(m["step"]), ppl))
    return {split: sorted(points) for split, points in curves.items()}


def plot_validation_curves(train_dirs, names, out_path) -> Path:
    """Validation perplexity over training steps, one line per run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    for train_dir, name in zip(train_dirs, names):
        for split, points in validation_curve(train_dir).items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name} ({split})")
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise UserError("no validation results (singletoken__*_{step}.json) in the training directories")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Validation perplexity during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(out_path)


def rep_ppl_points(rows: list[Row], column: str = "seq-rep-4") -> list[tuple]:
    """``(ppl, value of column, label)`` of every row that has both."""
    return [(r.values["ppl"], r.values[column], f"{r.run} ({r.decoding})") for r in rows
            if r.values.get("ppl") is not None and r.values.get(column) is not None]


def plot_seq_rep_vs_ppl(rows: list[Row], out_path) -> Path:
    """seq-rep-4 against perplexity, one point per run and decoding (PNG)."""
    return plot_against_ppl(rows, out_path, "seq-rep-4")


def plot_against_ppl(rows: list[Row], out_path, column: str, *, lower_is_better: bool = True) -> Path:
    """``column`` (seq-rep-4, diversity ...) against perplexity, one point per run and
    decoding, a colour per decoding, each point labelled with its run (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    points = [(r.values["ppl"], r.values[column], r.run, r.decoding) for r in rows
              if r.values.get("ppl") is not None and r.values.get(column) is not None]
    if not points:
        raise UserError(f"no run has both a perplexity and a {column} to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for decoding in dict.fromkeys(p[3] for p in points):
        group = [p for p in points if p[3] == decoding]
        ax.scatter([p[0] for p in group], [p[1] for p in group], s=45, label=decoding)
        for ppl, value, run, _ in group:
            ax.annotate(run, (ppl, value), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(x=0.3, y=0.2)  # room for the labels
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_ylabel(f"{column} ({'lower' if lower_is_better else 'higher'} is better)")
    ax.set_title(f"{column[0].upper()}{column[1:]} against perplexity")
    ax.grid(alpha=0.3)
    ax.legend(title="decoding", fontsize=8)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(out_path)
