"""The offline demo, shortened (configs/demo_ci.yaml), end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--config", str(ROOT / "configs" / "demo_ci.yaml"),
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out / "report"
    table = (report / "report.md").read_text().splitlines()
    assert table[0].startswith("| run | model | split | decoding | seq-rep-1 | seq-rep-4 | uniq-seq | ppl |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| MLE", "| ScaleGrad", "| human"]
    for name in ("validation_ppl.png", "seq_rep_vs_ppl.png"):
        data = (report / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["runs"]) == {"MLE", "ScaleGrad"}
    # The numbers in the table are the ones in the result files.
    result = json.loads(next((out / "eval-ScaleGrad").glob("completion__*.json")).read_text())
    assert summary["runs"]["ScaleGrad"]["seq-rep-4"] == f"{result['bpe_metrics']['bpe_test/pct_repeat_4grams']:.3f}"
    assert "ScaleGrad vs MLE: seq-rep-4 lower:" in proc.stdout

    # A second run finds every stage done and only redoes the report.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert "=== pretrain" not in again.stdout and "=== report" in again.stdout


def test_demo_bad_config_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nunknown: 1\n")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: demo config")
