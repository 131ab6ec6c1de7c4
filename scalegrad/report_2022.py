"""The report's columns and plot of the 2022 papers' metrics (``docs/metrics-2022.md``,
"In the report"): rep-2/3/4, diversity, gen-length, MAUVE and coherence, taken from a
completion result's ``text_metrics`` (the layout of
:func:`scalegrad.text_metrics.score_samples`), as mean and standard deviation when
the result holds several samples, and the human references' row.

:mod:`scalegrad.report` calls these; rows are its ``Row`` objects (``run``,
``decoding``, ``values`` and ``std``), used here by their attributes only.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

__all__ = ["TEXT_COLUMNS", "text_metric_values", "human_text_values", "diversity_mauve_points",
           "plot_diversity_vs_mauve"]

#: The new columns, after the original report's; each shown when some row has it.
TEXT_COLUMNS = ["rep-2", "rep-3", "rep-4", "diversity", "gen-length", "mauve", "coherence",
                "simcse-coherence"]


def _block(result: dict) -> dict:
    block = result.get("text_metrics")
    return block if isinstance(block, dict) else {}


def _numbers(values) -> dict:
    if not isinstance(values, dict):
        return {}
    return {c: values[c] for c in TEXT_COLUMNS
            if isinstance(values.get(c), (int, float)) and not isinstance(values.get(c), bool)}


def text_metric_values(result: dict) -> tuple[dict, dict]:
    """``(values, std)`` of the new columns in a completion result (empty when it has
    no ``text_metrics``); ``std`` only with several samples."""
    block = _block(result)
    return _numbers(block.get("metrics")), _numbers(block.get("std"))


def human_text_values(result: dict) -> dict:
    """The human references' new columns (``text_metrics.human``), MAUVE excluded."""
    values = _numbers(_block(result).get("human"))
    values.pop("mauve", None)
    return values


def diversity_mauve_points(rows) -> list[tuple]:
    """``(mauve, diversity, mauve std, diversity std, label)`` of each row with both."""
    points = []
    for r in rows:
        if r.values.get("mauve") is None or r.values.get("diversity") is None:
            continue
        std = getattr(r, "std", None) or {}
        points.append((r.values["mauve"], r.values["diversity"], std.get("mauve", 0.0),
                       std.get("diversity", 0.0), f"{r.run} ({r.decoding})"))
    return points


def plot_diversity_vs_mauve(rows, out_path) -> Path:
    """Diversity against MAUVE, one point per run and decoding, with the standard
    deviations over the samples as error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    points = diversity_mauve_points(rows)
    if not points:
        raise UserError("no run has both a MAUVE and a diversity to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for mauve, diversity, mauve_std, diversity_std, label in points:
        ax.errorbar([mauve], [diversity], xerr=[mauve_std], yerr=[diversity_std], fmt="o",
                    capsize=3)
        ax.annotate(label, (mauve, diversity), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.margins(x=0.3, y=0.2)
    ax.set_xlabel("MAUVE (higher is closer to human text)")
    ax.set_ylabel("diversity (higher is less repetitive)")
    ax.set_title("Diversity against MAUVE")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(out_path)
