"""The original release's install step and commands, run as its README says.

The original installed by copying its module folder into a fairseq checkout
(``cp -r custom $FAIRSEQ_DIR/fairseq``) and ran, from the checkout's base
directory, ``python fairseq/custom/gpt2/run_gpt2.py --mode train ...`` and
``... --mode eval-both ...``. Here the package folder is copied the same way into
a stand-in checkout whose ``fairseq/`` folder holds the installed fairseq
package's entries (``logging/``, ``data/`` ...: what would shadow other modules
if that folder got onto ``sys.path``), and both commands run as subprocesses
with the checkout as the working directory and no PYTHONPATH. The package is
also pip-installed (editable) in the test environment: the log's logger names
(``custom.gpt2...``) show that the copy is what runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scalegrad.data import load_split, save_split, split_path
from tests import helpers

pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "scalegrad"
ENTRY = "fairseq/custom/gpt2/run_gpt2.py"
SPLIT_SIZES = {"train": 2000, "valid": 1300, "test": 1300}


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def run_entry(checkout, *argv, timeout=300):
    return subprocess.run([sys.executable, ENTRY, *map(str, argv)], cwd=checkout,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def test_copy_runs_without_shadowing(tmp_path):
    """Running the copied file must not put its own folder (``gpt2/``, whose
    ``evaluate.py``, ``options.py`` ... shadow top-level modules) nor fairseq's
    package folder (``logging/`` ...) on ``sys.path``. A ``json.py`` planted in the
    copy's ``gpt2/`` folder would be what ``import json`` finds if it were."""
    checkout, copy = helpers.make_fairseq_checkout(tmp_path / "fairseq_checkout", PACKAGE_DIR)
    (copy / "gpt2" / "json.py").write_text(
        "raise ImportError('the copy\\'s gpt2/ folder shadows top-level modules')\n")
    proc = run_entry(checkout, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: run_gpt2.py")
    assert "--data-base" in proc.stdout and "--mode" in proc.stdout
    # a user mistake: one line, exit 2, as from scripts/run_gpt2.py
    proc = run_entry(checkout, "--data-base", tmp_path / "missing", "--output-dir", tmp_path / "out",
                     "--mode", "eval-singletoken", "--eval-split", "valid", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--data-base" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def printed(stdout: str, label: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(label + ": ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(label) + 2:])


def saved(stdout: str, checkout: Path) -> list[Path]:
    return [checkout / line[len("saved "):] for line in stdout.splitlines()
            if line.startswith("saved ")]


@pytest.mark.slow
def test_original_readme_commands_from_a_copy(tiny_model_dir, tiny_data_base, tmp_path):
    """Both commands of the original README, from the copy, in the checkout."""
    checkout, _ = helpers.make_fairseq_checkout(tmp_path / "fairseq_checkout", PACKAGE_DIR)
    data = checkout / "data-bin" / "wikitext-103-bpe_v0"
    for split, size in SPLIT_SIZES.items():
        save_split(load_split(split_path(tiny_data_base, split))[:size], split_path(data, split))

    train = run_entry(
        checkout, "--data-base", "./data-bin/wikitext-103-bpe_v0", "--output-dir", "./checkpoint/gpt-2",
        "--eval-split", "valid", "--train-n-steps", 2, "--validate-every", 2, "--mode", "train",
        "--train-batch-size", 16, "--gamma", 0.2, "--learning-rate", 2e-5, "--seed", 60,
        "--model-name", tiny_model_dir, "--no-progress",
    )
    assert train.returncode == 0, train.stderr[-4000:]
    # the copy runs (as the package "custom"), not the installed scalegrad
    assert " - custom.gpt2." in train.stderr and "scalegrad.gpt2" not in train.stderr
    assert train.stdout.splitlines()[-1].startswith("training finished: 3 steps")
    best = checkout / "checkpoint" / "gpt-2" / "best"
    assert (best / "config.json").is_file() and (best / "model.safetensors").is_file()

    evaluate = run_entry(
        checkout, "--data-base", "./data-bin/wikitext-103-bpe_v0", "--output-dir",
        "./checkpoint/gpt-2/sg_output", "--eval-split", "test", "--model-load-dir",
        "./checkpoint/gpt-2/best", "--mode", "eval-both", "--no-progress",
    )
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    assert " - custom.gpt2." in evaluate.stderr and "scalegrad.gpt2" not in evaluate.stderr
    # the metrics and the written files on stdout, as the original printed them
    files = saved(evaluate.stdout, checkout)
    out = checkout / "checkpoint" / "gpt-2" / "sg_output"
    assert sorted(p.resolve() for p in files) == sorted(p.resolve() for p in out.iterdir())
    assert [p.name for p in files] == [
        "singletoken__gpt2-medium__spl_test__bsz_1024.json",
        "completion__gpt2-medium__spl_test__topk_1__topp_0.0__pfl_50__cnl_100.json",
    ]
    singletoken = json.loads(files[0].read_text())
    assert printed(evaluate.stdout, "single-token metrics") == pytest.approx(singletoken["metrics"])
    completion = json.loads(files[1].read_text())
    shown = printed(evaluate.stdout, "completion metrics")
    assert shown["bpe_metrics"] == pytest.approx(completion["bpe_metrics"])
    assert shown["word_metrics"] == pytest.approx(completion["word_metrics"])
    assert shown["uniq"] == completion["uniq"]
    assert len(completion["completions"]) > 0
