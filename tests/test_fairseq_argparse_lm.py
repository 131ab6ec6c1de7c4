"""A fairseq language model whose architecture is registered the argparse way
(``fconv_lm``: fairseq records its config as an ``argparse.Namespace`` in the
checkpoint) is evaluated like any other fairseq LM."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fairseq")

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_fconv_lm_checkpoint_evaluates(tmp_path):
    from pydoc_data.topics import topics

    lines = [line.strip() for key in sorted(topics) for line in topics[key].splitlines() if line.strip()]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text("\n".join(lines[:300]) + "\n", encoding="utf-8")
    (raw / "valid.txt").write_text("\n".join(lines[300:330]) + "\n", encoding="utf-8")
    data_bin = tmp_path / "bin"
    subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--only-source",
                    "--trainpref", str(raw / "train.txt"), "--validpref", str(raw / "valid.txt"),
                    "--destdir", str(data_bin), "--workers", "1", "--nwordssrc", "500"],
                   check=True, capture_output=True, env=_env())
    save_dir = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, "-m", "fairseq_cli.train", str(data_bin), "--task", "language_modeling",
         "--arch", "fconv_lm", "--decoder-embed-dim", "32", "--decoder-layers", "[(32, 2)] * 2",
         "--decoder-out-embed-dim", "32", "--tokens-per-sample", "32", "--max-tokens", "256",
         "--cpu", "--optimizer", "adam", "--lr", "0.001", "--max-update", "1", "--num-workers", "0",
         "--no-progress-bar", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
         "--disable-validation"],
        capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate_fairseq.py"), "--data-dir", str(data_bin),
         "--model-path", str(save_dir), "--ckpt", "last", "--save-path", str(out), "--eval-mode", "all",
         "--batch-size-single-prediction", "32", "--data-prefix-length", "4", "--completion-length",
         "3", "--batch-size-completions", "2", "--num-samples", "0", "--no-progress"],
        capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    [metrics] = out.glob("metrics_*.json")
    values = json.loads(metrics.read_text())
    assert values["checkpoint_step"] == 1
    assert values["valid/ppl"] > 1
    [completions] = out.glob("completions_*.txt")
    assert [len(line.split()) for line in completions.read_text().splitlines()] == [4 + 3] * 2
