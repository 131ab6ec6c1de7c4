"""``scalegrad-compare``: the paper's comparison of training objectives from one command
(``docs/compare.md``).

Every objective of ``configs/compare.yaml`` is trained on the same data, from the same
MLE-pretrained model, for the same steps with the same seed, then evaluated with every
decoding of the config; the result files become one table (Markdown and CSV) and plots.
The stages are those of the demo (``scalegrad/demo.py``, whose helpers this reuses):
each runs one of the project's command lines in a subprocess, printed first, and is
skipped when its output exists (``force=True`` redoes it):

1. ``data/``: ``scalegrad-prepare-data`` with the ``data`` section's flags;
2. ``init/``: a randomly initialised GPT-2 of the ``model`` section's shape;
3. ``pretrain/``: MLE from scratch (the paper's pretrained GPT-2);
4. ``train/NAME/``: each objective finetuned from ``pretrain/`` (or from the model of the
   objective its ``start_from`` names: sequence-level unlikelihood starts from the MLE
   model, as in the original) with the ``finetune`` section's flags and its own;
   an interrupted training resumes from its checkpoint (``run_gpt2.py --resume``);
5. ``eval/NAME/singletoken/`` (perplexity, acc, rep, wrep, uniq) and
   ``eval/NAME/DECODING/`` (the completion metrics of each decoding);
6. ``comparison.md``, ``comparison.csv``, ``seq_rep_vs_ppl.png`` (and
   ``diversity_vs_ppl.png`` when the results carry diversity), ``summary.json``.

The whole configuration is checked before the first stage, every run_gpt2.py command
line through run_gpt2.py's own parser and checks, so a mistake in it is one error line
and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import yaml

from ..demo import SCRIPTS, Demo, flags
from ..errors import UserError, reports_user_errors
from ..io import atomic_path, write_json
from ..report import (Row, completion_values, human_text_values, plot_against_ppl, render,
                      singletoken_values, text_metric_values)
from .options import build_parser, check_args

SECTIONS = ("output_dir", "data", "model", "common", "pretrain", "finetune", "objectives",
            "decodings", "evaluate")

#: Objective kinds: the run_gpt2.py flags each one must be given, the values it fixes,
#: and a short description for the table (``{flag}`` fields filled from its flags).
OBJECTIVE_KINDS = {
    "mle": {"required": (), "fixed": {"objective": "scalegrad", "gamma": 1.0}, "label": "MLE"},
    "scalegrad": {"required": ("gamma",), "fixed": {"objective": "scalegrad"},
                  "label": "ScaleGrad gamma {gamma}"},
    "token-ul": {"required": ("rank_alpha",), "fixed": {"objective": "candidate_penalty_cross_entropy"},
                 "label": "token UL alpha {rank_alpha}"},
    "sequence-ul": {"required": ("sequence_tune_rate",), "fixed": {},
                    "label": "sequence UL rate {sequence_tune_rate}"},
    "contrastive-token": {"required": (), "fixed": {"objective": "contrastive_token"},
                          "label": "CT ct_length {ct_length}, negatives {ct_preced_m_negatives}"},
    "simctg": {"required": (), "fixed": {"objective": "simctg"}, "label": "SimCTG margin {simctg_margin}"},
}

#: Decoding kinds: the completion flags each one must be given and those it fixes.
DECODING_KINDS = {
    "greedy": {"required": (), "fixed": {"top_k": 1, "top_p": 0.0}},
    "top-k": {"required": ("top_k",), "fixed": {"top_p": 0.0}},
    "top-p": {"required": ("top_p",), "fixed": {"top_k": 0}},
    "contrastive": {"required": ("penalty_alpha", "top_k"), "fixed": {"top_p": 0.0}},
}

#: The table's columns: the paper's; the report adds those of the 2022 papers that the
#: results have (rep-2/3/4, diversity, gen-length, MAUVE, coherence: docs/metrics-2022.md).
PAPER_COLUMNS = ["seq-rep-4", "uniq-seq", "ppl", "acc", "rep", "wrep", "uniq"]
LABELS = ("run", "model", "decoding")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: common-section flags that the evaluation stages take too (the others are training flags).
EVAL_COMMON = ("batch_size_singletoken", "batch_size_completion", "seed", "no_progress", "device")


def load_config(path) -> dict:
    """Read and check a comparison config (the sections of :data:`SECTIONS`)."""
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise UserError(f"cannot read compare config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        first = (str(exc).strip().splitlines() or ["?"])[0]
        raise UserError(f"compare config {path} is not valid YAML: {first}") from None
    if not isinstance(config, dict):
        raise UserError(f"compare config {path} must be a mapping of sections")
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise UserError(f"compare config {path}: unknown section(s) {unknown}; known: {list(SECTIONS)}")
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise UserError(f"compare config {path}: missing section(s) {missing}")
    for section in SECTIONS[1:]:
        if not isinstance(config[section], dict):
            raise UserError(f"compare config {path}: section {section} must be a mapping")
    for section, kinds in (("objectives", OBJECTIVE_KINDS), ("decodings", DECODING_KINDS)):
        if not config[section]:
            raise UserError(f"compare config {path}: section {section} is empty")
        for name, entry in config[section].items():
            what = f"compare config {path}: {section[:-1]} {name!r}"
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise UserError(f"{what}: a name is letters, digits, '.', '_' and '-' (it names folders)")
            if not isinstance(entry, dict) or "kind" not in entry:
                raise UserError(f"{what} needs a mapping with a 'kind' ({', '.join(kinds)})")
            kind = kinds.get(entry["kind"])
            if kind is None:
                raise UserError(f"{what}: unknown kind {entry['kind']!r}; known: {', '.join(kinds)}")
            options = {k: v for k, v in entry.items() if k not in ("kind", "start_from")}
            absent = [k for k in kind["required"] if k not in options]
            if absent:
                raise UserError(f"{what} of kind {entry['kind']} needs {', '.join(absent)}")
            clash = [k for k in kind["fixed"] if k in options and options[k] != kind["fixed"][k]]
            if clash:
                raise UserError(f"{what}: kind {entry['kind']} fixes {', '.join(clash)}; drop it")
    names = list(config["objectives"])
    for name, entry in config["objectives"].items():
        start = entry.get("start_from")
        if entry["kind"] == "sequence-ul" and start is None:
            raise UserError(f"compare config {path}: objective {name!r} (sequence-ul) needs "
                            f"start_from: the objective whose model it finetunes (MLE in the paper)")
        if start is not None and (start not in names or names.index(start) >= names.index(name)):
            raise UserError(f"compare config {path}: objective {name!r}: start_from {start!r} must "
                            f"name an objective listed before it")
    from transformers import GPT2Config

    shape = GPT2Config()
    bad = [k for k in config["model"] if k != "seed" and not hasattr(shape, k)]
    if bad:
        raise UserError(f"compare config {path}: model keys {bad} are not GPT2Config fields")
    return config


def _check_run_gpt2(argv: list[str], what: str) -> None:
    """Parse and check one run_gpt2.py command line as run_gpt2.py would (the data folder
    does not exist yet: a stand-in folder is checked instead)."""
    parser = build_parser()

    def error(message):
        raise UserError(f"{what}: {message}")

    parser.error = error
    args = parser.parse_args(argv)
    args.data_base = os.fspath(SCRIPTS)
    try:
        check_args(args)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


class Comparison(Demo):
    """Runs the stages of the module doc; :meth:`run` returns the summary."""

    what = "compare"

    def __init__(self, config: dict, output_dir=None, *, force: bool = False, python: str | None = None):
        super().__init__(config, output_dir, force=force, python=python)
        self.data = self.out / "data"
        self.plan = self._plan()

    # -- the command lines ---------------------------------------------------
    def _objective_options(self, name: str) -> dict:
        entry = self.config["objectives"][name]
        kind = OBJECTIVE_KINDS[entry["kind"]]
        own = {k: v for k, v in entry.items() if k not in ("kind", "start_from")}
        return {**self.config["finetune"], **kind["fixed"], **own}

    def _train_argv(self, model: Path, out_dir: Path, options: dict) -> list[str]:
        opts = {**self.config["common"], **options}
        if not self.force:
            opts["resume"] = True  # an interrupted training goes on from its checkpoint
        return [str(SCRIPTS / "run_gpt2.py"), "--mode", "train", "--model-name", str(model),
                "--data-base", str(self.data), "--output-dir", str(out_dir), *flags(opts)]

    def _eval_argv(self, name: str, mode: str, out_dir: Path, decoding: dict | None) -> list[str]:
        common = {k: v for k, v in self.config["common"].items() if k in EVAL_COMMON}
        opts = {**common, **self.config["evaluate"]}
        if decoding is not None:
            kind = DECODING_KINDS[decoding["kind"]]
            opts.update({**kind["fixed"], **{k: v for k, v in decoding.items() if k != "kind"}})
        # "{out}" in a value stands for the output folder (a featurizer: "{out}/pretrain").
        opts = {k: v.format(out=self.out) if isinstance(v, str) else v for k, v in opts.items()}
        return [str(SCRIPTS / "run_gpt2.py"), "--mode", mode, "--model-name", name,
                "--model-load-dir", str(self.out / "train" / name), "--data-base", str(self.data),
                "--output-dir", str(out_dir), *flags(opts)]

    def _plan(self) -> dict:
        """Every run_gpt2.py command line, checked before anything runs."""
        plan = {"pretrain": self._train_argv(self.out / "init", self.out / "pretrain",
                                             self.config["pretrain"])}
        _check_run_gpt2(plan["pretrain"][1:], "compare config, pretrain")
        for name, entry in self.config["objectives"].items():
            start = entry.get("start_from")
            model = self.out / "train" / start if start else self.out / "pretrain"
            argv = self._train_argv(model, self.out / "train" / name, self._objective_options(name))
            _check_run_gpt2(argv[1:], f"compare config, objective {name}")
            plan[f"train {name}"] = argv
            argv = self._eval_argv(name, "eval-singletoken", self._eval_dir(name, "singletoken"), None)
            _check_run_gpt2(argv[1:], f"compare config, evaluate {name}")
            plan[f"evaluate {name}"] = argv
            for decoding, options in self.config["decodings"].items():
                argv = self._eval_argv(name, "eval-completion", self._eval_dir(name, decoding), options)
                _check_run_gpt2(argv[1:], f"compare config, decoding {decoding}")
                plan[f"decode {name} {decoding}"] = argv
        return plan

    def _eval_dir(self, name: str, what: str) -> Path:
        return self.out / "eval" / name / what

    # -- stages ----------------------------------------------------------------
    def _stage(self, stage: str, done: bool) -> None:
        """Run one planned stage unless ``done`` (and not forced); its time goes to
        ``timings.json``, kept across runs, so a resumed comparison still knows every
        stage's time."""
        if done and not self.force:
            return
        timings = self._timings()
        if timings.pop(stage, None) is not None:  # redone: not finished until it ends again
            write_json(self.out / "timings.json", timings, indent=2)
        self._run(stage, self.plan[stage])
        timings = self._timings()
        timings[stage] = self.timings[stage]
        write_json(self.out / "timings.json", timings, indent=2)

    def _trained(self, stage: str, out_dir: Path) -> bool:
        """A training is done when its stage finished (``timings.json``) and its model is
        there: ``model.safetensors`` alone also appears at each ``--save-every``."""
        return stage in self._timings() and (out_dir / "model.safetensors").exists()

    def _timings(self) -> dict:
        path = self.out / "timings.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def run(self) -> dict:
        start = time.perf_counter()
        if not (self._done(self.data / "test_tokens_bpe_gpt2.pt") and self._done(self.out / "init" / "config.json")):
            self.prepare_data()
            self.init_model(self.data)
            write_json(self.out / "timings.json", {**self._timings(), "prepare data and model":
                                                   round(time.perf_counter() - start, 1)}, indent=2)
        self._stage("pretrain", self._trained("pretrain", self.out / "pretrain"))
        for name in self.config["objectives"]:
            self._stage(f"train {name}", self._trained(f"train {name}", self.out / "train" / name))
            self._stage(f"evaluate {name}", any(self._eval_dir(name, "singletoken").glob("singletoken__*.json")))
            for decoding in self.config["decodings"]:
                self._stage(f"decode {name} {decoding}",
                            any(self._eval_dir(name, decoding).glob("completion__*.json")))
        rows = self.rows()
        summary = self.write_outputs(rows)
        summary["seconds"] = {"this run": round(time.perf_counter() - start, 1),
                              "stages (all runs)": self._timings()}
        summary["seconds"]["total of the stages"] = round(sum(summary["seconds"]["stages (all runs)"].values()), 1)
        write_json(self.out / "summary.json", summary, indent=2)
        return summary

    # -- the table -------------------------------------------------------------
    def rows(self) -> list[Row]:
        """One row per objective and decoding (config order), then the human text's row."""
        split = self.config["evaluate"].get("eval_split", "test")
        rows, human = [], None
        for name, entry in self.config["objectives"].items():
            metrics = _result(self._eval_dir(name, "singletoken"), "singletoken__*.json")["metrics"]
            token_values = singletoken_values(metrics)
            if human is None:
                human = Row("human", "-", split, "-", {"rep": metrics.get("human_repeat_at_1/128"),
                                                      "uniq": metrics.get("human_uniq")})
            options = self._objective_options(name)
            label = OBJECTIVE_KINDS[entry["kind"]]["label"].format(**options)
            if entry.get("start_from"):
                label += f" (from {entry['start_from']})"
            for decoding in self.config["decodings"]:
                result = _result(self._eval_dir(name, decoding), "completion__*.json")
                text_values, std = text_metric_values(result)  # docs/metrics-2022.md
                values = {**completion_values(result, split), **token_values, **text_values}
                values.update(_sample_means(result, split))
                rows.append(Row(name, label, split, decoding, values, std=std))
                for column, value in human_text_values(result).items():
                    human.values.setdefault(column, value)
        return rows + ([human] if human is not None else [])

    def write_outputs(self, rows: list[Row]) -> dict:
        tables = {fmt: render(rows, fmt, columns=PAPER_COLUMNS, labels=LABELS) for fmt in ("markdown", "csv")}
        columns = tables["csv"].splitlines()[0].split(",")[len(LABELS):]
        for fmt, suffix in (("markdown", "md"), ("csv", "csv")):
            with atomic_path(self.out / f"comparison.{suffix}") as tmp:
                tmp.write_text(tables[fmt], encoding="utf-8")
        plots = [plot_against_ppl(rows, self.out / "seq_rep_vs_ppl.png", "seq-rep-4")]
        if any(r.values.get("diversity") is not None for r in rows):
            plots.append(plot_against_ppl(rows, self.out / "diversity_vs_ppl.png", "diversity",
                                          lower_is_better=False))
        baseline = next(iter(self.config["objectives"]))
        greedy = next((r for r in rows if r.run == baseline and r.decoding == "greedy"), None)
        return {
            "table": str(self.out / "comparison.md"),
            "csv": str(self.out / "comparison.csv"),
            "plots": [str(p) for p in plots],
            "columns": columns,
            "rows": [{"run": r.run, "model": r.model, "decoding": r.decoding, **r.values,
                      **{f"{c} std": v for c, v in r.std.items()}} for r in rows],
            "baseline": baseline,
            "baseline_greedy_seq_rep_4": greedy.values.get("seq-rep-4") if greedy else None,
        }


def _sample_means(result: dict, split: str) -> dict:
    """With several samples: seq-rep-4 and uniq-seq as their means over the samples
    (the result's own ``bpe_metrics`` and ``uniq`` are its first sample's)."""
    mean = (result.get("sample_statistics") or {}).get("mean") or {}
    values = {"seq-rep-4": mean.get(f"bpe_{split}/pct_repeat_4grams"), "uniq-seq": mean.get("uniq")}
    return {k: v for k, v in values.items() if v is not None}


def _result(directory: Path, pattern: str) -> dict:
    files = sorted(directory.glob(pattern))
    if not files:
        raise UserError(f"no result file {pattern} in {directory}; run without the stage's "
                        f"output removed, or with --force")
    try:
        return json.loads(files[0].read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read result file {files[0]}: {exc}") from None


COMPARE_DOC = """Train every objective of the config on the same data and steps, evaluate each
with every decoding, and write the comparison table (Markdown, CSV) and plots.

    scalegrad-compare [--config configs/compare.yaml] [--output-dir DIR] [--force]

Stages whose outputs exist are skipped (--force redoes them); a run stopped halfway goes
on from its finished stages (and an interrupted training from its checkpoint). See
docs/compare.md. (``python scripts/compare.py`` is the same command.)
"""


@reports_user_errors
def main(argv=None) -> int:
    """``scalegrad-compare``: 0, or 2 with one ``error:`` line."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=COMPARE_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "compare.yaml"),
                        help="the comparison config (default: configs/compare.yaml)")
    parser.add_argument("--output-dir", help="default: the config's output_dir")
    parser.add_argument("--force", action="store_true", help="redo stages whose outputs already exist")
    args = parser.parse_args(argv)
    out = Path(args.output_dir) if args.output_dir else None
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} is a file, not a folder")
    comparison = Comparison(load_config(args.config), out, force=args.force)
    summary = comparison.run()
    print("\n" + (comparison.out / "comparison.md").read_text(encoding="utf-8"))
    seq_rep = summary["baseline_greedy_seq_rep_4"]
    if seq_rep is not None:
        print(f"{summary['baseline']} greedy seq-rep-4: {seq_rep:.3f} (the paper's MLE: 0.44)")
    print("table: " + summary["table"] + ", " + summary["csv"])
    print("plots: " + ", ".join(summary["plots"]))
    stages = summary["seconds"]
    print(f"time: {stages['this run']} s this run, {stages['total of the stages']} s all stages "
          f"(summary: {comparison.out / 'summary.json'})")
    sys.stdout.flush()
    return 0
