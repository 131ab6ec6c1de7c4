"""The commands on the PATH after ``pip install`` (console scripts): declared in the
installed package's metadata, the same functions as the ``scripts/`` files, and
runnable: ``--help`` of each, and data preparation -> evaluation -> report through
the installed commands on a small text with the tiny model."""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalegrad import data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

COMMANDS = {
    "scalegrad-run-gpt2": ("scalegrad.gpt2.run_gpt2:main", "run_gpt2"),
    "scalegrad-prepare-data": ("scalegrad.cli:prepare_data_main", "prepare_data"),
    "scalegrad-report": ("scalegrad.cli:report_main", "report_metrics"),
    "scalegrad-score": ("scalegrad.score_cli:main", "score_generations"),
    "scalegrad-evaluate-fairseq": ("scalegrad.fairseq_plugin.eval_cli:main", "evaluate_fairseq"),
    "scalegrad-export-hf": ("scalegrad.fairseq_plugin.export_cli:main", "export_fairseq_to_hf"),
    "scalegrad-compare": ("scalegrad.gpt2.compare:main", "compare"),
}
REINSTALL = "reinstall the package: pip install --no-deps --no-build-isolation -e . (make setup)"


def installed_entry_points() -> dict:
    return {ep.name: ep for ep in importlib.metadata.distribution("scalegrad").entry_points
            if ep.group == "console_scripts"}


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(name, *args, cwd=None):
    executable = BIN / name
    assert executable.is_file(), f"{executable} is missing: {REINSTALL}"
    return subprocess.run([str(executable), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_the_commands_are_declared_and_are_the_scripts_functions():
    entry_points = installed_entry_points()
    assert {n: ep.value for n, ep in entry_points.items()} == \
        {n: target for n, (target, _) in COMMANDS.items()}, REINSTALL
    for name, (_, script) in COMMANDS.items():
        # The scripts/ file runs the very function the command runs.
        assert load_script(script).main is entry_points[name].load(), name


@pytest.mark.slow  # five interpreters importing torch
def test_every_command_answers_help():
    for name in COMMANDS:
        result = command(name, "--help")
        assert result.returncode == 0, (name, result.stderr)
        assert result.stdout.startswith("usage: "), (name, result.stdout[:200])
        assert "--output" in result.stdout or "--data-dir" in result.stdout, name


@pytest.mark.slow  # three commands end to end
def test_prepare_evaluate_report_through_the_commands(tiny_tokenizer_dir, tiny_model_dir, tmp_path):
    text = data.default_corpus_text()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text[: text.index("\n\n", 60_000) + 2], encoding="utf-8")

    # scalegrad-prepare-data: the three split files, the counts it prints are theirs.
    prepared = tmp_path / "prepared"
    result = command("scalegrad-prepare-data", "--input", corpus, "--output-dir", prepared,
                     "--tokenizer", tiny_tokenizer_dir, "--valid-fraction", 0.1,
                     "--test-fraction", 0.1)
    assert result.returncode == 0, result.stderr
    printed = {m.group(1): int(m.group(2))
               for m in re.finditer(r"^(\w+): (\d+) tokens", result.stdout, re.M)}
    assert set(printed) == set(data.SPLITS)
    for split in data.SPLITS:
        tokens = torch.load(data.split_path(prepared, split), weights_only=True)
        assert tokens.numel() == printed[split] > 1000

    # scalegrad-run-gpt2: both evaluations of the tiny model on that data.
    run_dir = tmp_path / "eval"
    result = command("scalegrad-run-gpt2", "--mode", "eval-both", "--eval-split", "valid",
                     "--data-base", prepared, "--output-dir", run_dir, "--model-load-dir",
                     tiny_model_dir, "--model-name", "tiny", "--batch-size-singletoken", 200,
                     "--batch-size-completion", 40, "--prefix-length", 10,
                     "--continuation-length", 12, "--no-progress")
    assert result.returncode == 0, result.stderr
    (result_file,) = run_dir.glob("singletoken__tiny__spl_valid__bsz_200.json")
    metrics = json.loads(result_file.read_text())["metrics"]
    (completion_file,) = run_dir.glob("completion__tiny__spl_valid__*.json")
    completion = json.loads(completion_file.read_text())
    assert f"saved {result_file}" in result.stdout and f"saved {completion_file}" in result.stdout
    assert json.loads(result.stdout.splitlines()[0].split(": ", 1)[1]) == pytest.approx(metrics)

    # scalegrad-report: the table row carries the result file's numbers.
    report_dir = tmp_path / "report"
    result = command("scalegrad-report", run_dir, "--names", "tiny-run", "--format", "csv",
                     "--output-dir", report_dir)
    assert result.returncode == 0, result.stderr
    rows = {row["run"]: row for row in csv.DictReader(io.StringIO(
        (report_dir / "report.csv").read_text()))}
    assert float(rows["tiny-run"]["ppl"]) == pytest.approx(metrics["ppl"], abs=5e-4)
    assert float(rows["tiny-run"]["acc"]) == pytest.approx(metrics["hits_at_1"], abs=5e-4)
    assert float(rows["tiny-run"]["seq-rep-4"]) == pytest.approx(
        completion["bpe_metrics"]["bpe_valid/pct_repeat_4grams"], abs=5e-4)
    assert int(rows["tiny-run"]["uniq-seq"]) == completion["uniq"]
    assert (report_dir / "report.md").is_file() and (report_dir / "seq_rep_vs_ppl.png").is_file()

    # A mistake through a command: one line, exit 2, nothing written.
    result = command("scalegrad-run-gpt2", "--mode", "train", "--data-base", prepared,
                     "--output-dir", tmp_path / "never", "--wandb-project", "p",
                     "--tensorboard-logdir", corpus / "tb")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: --tensorboard-logdir {corpus / 'tb'} cannot be created: {corpus} is a file, "
        f"not a folder; give a path under a folder"]
    assert not (tmp_path / "never").exists()
