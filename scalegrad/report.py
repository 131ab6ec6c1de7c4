"""Result files -> the paper's table (and plots).

Reads the JSON result files that ``scripts/run_gpt2.py`` and
``scripts/evaluate_fairseq.py`` write (``singletoken__{model}__spl_{split}__bsz_{n}[_{step}].json``
and ``completion__{model}__spl_{split}__topk_{k}__topp_{p}__pfl_{l}__cnl_{c}.json``, to which
``evaluate_fairseq.py`` adds ``__beam_{B}__ngb_{N}`` for beam search)
and builds one row per run and decoding setting with the columns of the
original report: ``seq-rep-1, seq-rep-4, uniq-seq, ppl, acc, rep, wrep, uniq``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

COLUMNS = ["seq-rep-1", "seq-rep-4", "uniq-seq", "ppl", "acc", "rep", "wrep", "uniq"]

SINGLETOKEN_RE = re.compile(
    r"^singletoken__(?P<model>.+?)__spl_(?P<split>[^_]+)__bsz_(?P<bsz>\d+)(?:_(?P<step>\d+))?\.json$")
COMPLETION_RE = re.compile(
    r"^completion__(?P<model>.+?)__spl_(?P<split>[^_]+)__topk_(?P<topk>[^_]+)__topp_(?P<topp>[^_]+)"
    r"__pfl_(?P<pfl>\d+)__cnl_(?P<cnl>\d+)(?:__beam_(?P<beam>\d+)__ngb_(?P<ngb>\d+))?\.json$")


@dataclass
class Row:
    run: str
    model: str
    split: str
    decoding: str
    values: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read result file {path}: {exc}") from None


def _decoding_name(topk: str, topp: str, beam: str | None = None, ngram_block: str | None = None) -> str:
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
    for run_dir, run_name in zip(run_dirs, names):
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise UserError(f"result directory {run_dir} does not exist")
        singletoken = {}
        for path in sorted(run_dir.glob("singletoken__*.json")):
            m = SINGLETOKEN_RE.match(path.name)
            if m and m["step"] is None:
                singletoken[(m["model"], m["split"])] = _read_json(path)["metrics"]
        completions = []
        for path in sorted(run_dir.glob("completion__*.json")):
            m = COMPLETION_RE.match(path.name)
            if m:
                completions.append((m, _read_json(path)))
        if not singletoken and not completions:
            raise UserError(f"no result files (singletoken__*.json, completion__*.json) in {run_dir}")
        keys_done = set()
        for m, result in completions:
            key = (m["model"], m["split"])
            row = Row(run_name, m["model"], m["split"], _decoding_name(m["topk"], m["topp"], m["beam"], m["ngb"]))
            row.values.update(completion_values(result, m["split"], view))
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
    return rows + list(human_rows.values())


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not float(value).is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def _table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "model", "split", "decoding"] + COLUMNS
    body = [[r.run, r.model, r.split, r.decoding] + [_fmt(r.values.get(c)) for c in COLUMNS] for r in rows]
    return header, body


def render(rows: list[Row], fmt: str = "text") -> str:
    header, body = _table(rows)
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
            ppl = _read_json(path)["metrics"].get("ppl")
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


def plot_seq_rep_vs_ppl(rows: list[Row], out_path) -> Path:
    """seq-rep-4 against perplexity, one point per run and decoding (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    points = [(r.values["ppl"], r.values["seq-rep-4"], f"{r.run} ({r.decoding})") for r in rows
              if r.values.get("ppl") is not None and r.values.get("seq-rep-4") is not None]
    if not points:
        raise UserError("no run has both a perplexity and a seq-rep-4 to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for ppl, rep, label in points:
        ax.scatter([ppl], [rep], s=50)
        ax.annotate(label, (ppl, rep), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(x=0.3, y=0.2)  # room for the labels
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_ylabel("seq-rep-4 (lower is better)")
    ax.set_title("Repetition against perplexity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(out_path)
