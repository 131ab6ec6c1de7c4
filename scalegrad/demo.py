"""The offline MLE-versus-ScaleGrad demo behind ``scripts/demo.py``.

Every stage runs the project's own command lines (``prepare_data.py``,
``run_gpt2.py``, ``report_metrics.py``) in a subprocess and prints the command
first, so each step can be re-run by hand. A stage whose output is already
complete is skipped (``force=True`` redoes everything), so a second run of the
demo is quick.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SECTIONS = {"output_dir", "data", "model", "common", "pretrain", "finetune", "runs", "evaluate"}


def load_config(path) -> dict:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise UserError(f"cannot read demo config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"demo config {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"demo config {path} must be a mapping of sections")
    unknown = set(config) - SECTIONS
    if unknown:
        raise UserError(f"demo config {path}: unknown section(s) {sorted(unknown)}; "
                        f"known: {sorted(SECTIONS)}")
    missing = SECTIONS - set(config)
    if missing:
        raise UserError(f"demo config {path}: missing section(s) {sorted(missing)}")
    return config


def flags(options: dict) -> list[str]:
    """``{'train_batch_size': 128, 'no_progress': True}`` -> command-line flags."""
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


class Demo:
    #: What the stages belong to, in the error of a failed stage.
    what = "demo"

    def __init__(self, config: dict, output_dir=None, *, force: bool = False, python: str | None = None):
        self.config = config
        self.out = Path(output_dir or config["output_dir"])
        self.force = force
        self.python = python or sys.executable
        self.timings: dict[str, float] = {}

    # -- helpers ----------------------------------------------------------
    def _run(self, stage: str, argv: list[str]) -> None:
        command = [self.python, *argv]
        print(f"\n=== {stage}\n$ {shlex.join(command)}", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env)
        self.timings[stage] = round(time.perf_counter() - start, 1)
        if proc.returncode != 0:
            raise UserError(f"{self.what} stage '{stage}' failed (exit status {proc.returncode}); see its output above")

    def _done(self, marker: Path) -> bool:
        return marker.exists() and not self.force

    # -- stages -----------------------------------------------------------
    def prepare_data(self) -> Path:
        data = self.out / "data"
        if not self._done(data / "test_tokens_bpe_gpt2.pt"):
            self._run("prepare data", [str(SCRIPTS / "prepare_data.py"), "--output-dir", str(data),
                                       *flags(self.config["data"])])
        return data

    def init_model(self, data: Path) -> Path:
        init = self.out / "init"
        if self._done(init / "config.json"):
            return init
        print("\n=== initialise a small GPT-2-shaped model", flush=True)
        import torch
        from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

        from .io import atomic_path

        options = dict(self.config["model"])
        seed = options.pop("seed", 0)
        tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, **options)
        model = GPT2LMHeadModel(config)
        with atomic_path(init, is_dir=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        print(f"{sum(p.numel() for p in model.parameters()):,} parameters -> {init}")
        return init

    def train(self, stage: str, model: Path, data: Path, out_dir: Path, options: dict) -> Path:
        if not self._done(out_dir / "model.safetensors"):
            opts = {**self.config["common"], **options}
            self._run(stage, [str(SCRIPTS / "run_gpt2.py"), "--mode", "train", "--model-name", str(model),
                              "--data-base", str(data), "--output-dir", str(out_dir), *flags(opts)])
        return out_dir

    def evaluate(self, name: str, model: Path, data: Path) -> Path:
        out_dir = self.out / f"eval-{name}"
        ev = self.config["evaluate"]
        done = list(out_dir.glob("completion__*.json")) and list(out_dir.glob("singletoken__*.json"))
        if not (done and not self.force):
            opts = {**{k: v for k, v in self.config["common"].items()
                       if k in ("batch_size_singletoken", "batch_size_completion", "seed", "no_progress")},
                    **ev}
            self._run(f"evaluate {name}", [str(SCRIPTS / "run_gpt2.py"), "--mode", "eval-both",
                                           "--model-name", "demo", "--model-load-dir", str(model),
                                           "--data-base", str(data), "--output-dir", str(out_dir),
                                           *flags(opts)])
        return out_dir

    def report(self, eval_dirs: dict[str, Path], train_dirs: dict[str, Path]) -> Path:
        report = self.out / "report"
        self._run("report", [str(SCRIPTS / "report_metrics.py"), *map(str, eval_dirs.values()),
                             "--names", *eval_dirs, "--train-dirs", *map(str, train_dirs.values()),
                             "--train-names", *train_dirs, "--output-dir", str(report),
                             "--format", "markdown"])
        return report

    # -- the whole demo -----------------------------------------------------
    def run(self) -> dict:
        start = time.perf_counter()
        data = self.prepare_data()
        init = self.init_model(data)
        pretrained = self.train("pretrain (MLE)", init, data, self.out / "pretrain", self.config["pretrain"])
        eval_dirs, train_dirs = {}, {}
        for name, options in self.config["runs"].items():
            finetuned = self.train(f"finetune {name}", pretrained, data, self.out / f"finetune-{name}",
                                   {**self.config["finetune"], **options})
            train_dirs[name] = finetuned
            eval_dirs[name] = self.evaluate(name, finetuned, data)
        report = self.report(eval_dirs, train_dirs)
        summary = summarise(report, list(self.config["runs"]))
        summary["seconds"] = {**self.timings, "total": round(time.perf_counter() - start, 1)}
        from .io import write_json
        write_json(report / "summary.json", summary, indent=2)
        return summary


def summarise(report_dir: Path, names: list[str]) -> dict:
    """The demo's claim, read back from the report: the first run is the
    baseline (MLE), the others are compared with it."""
    import csv

    with open(report_dir / "report.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f) if row["decoding"] == "greedy"}
    base = rows[names[0]]
    summary = {"baseline": names[0], "runs": {}}
    for name in names:
        row = rows[name]
        entry = {k: row[k] for k in ("seq-rep-1", "seq-rep-4", "uniq-seq", "ppl", "acc", "rep", "wrep", "uniq")}
        if name != names[0]:
            entry["lower_seq_rep_4_than_baseline"] = float(row["seq-rep-4"]) < float(base["seq-rep-4"])
            entry["higher_uniq_seq_than_baseline"] = int(row["uniq-seq"]) > int(base["uniq-seq"])
            entry["ppl_change"] = float(row["ppl"]) - float(base["ppl"])
        summary["runs"][name] = entry
    summary["plots"] = [str(report_dir / "validation_ppl.png"), str(report_dir / "seq_rep_vs_ppl.png")]
    return summary


def print_summary(report: Path, summary: dict) -> None:
    print("\n" + (report / "report.md").read_text())
    for name, entry in summary["runs"].items():
        if name == summary["baseline"]:
            continue
        print(f"{name} vs {summary['baseline']}: seq-rep-4 lower: {entry['lower_seq_rep_4_than_baseline']}, "
              f"uniq-seq higher: {entry['higher_uniq_seq_than_baseline']}, "
              f"perplexity change: {entry['ppl_change']:+.2f}")
    print("plots: " + ", ".join(summary["plots"]))
    print(f"summary: {report / 'summary.json'} ({summary['seconds']['total']} s)")
