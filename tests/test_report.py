import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalegrad.report import collect_rows, render, validation_curve

ROOT = Path(__file__).resolve().parent.parent


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run_dir(tmp_path, name, ppl, seq_rep_4, uniq_seq, steps=()):
    d = tmp_path / name
    metrics = {"loss": 4.0, "ppl": ppl, "hits_at_1": 0.4, "repeat_at_1/128": 0.6,
               "wrong_repeat_at_1/128": 0.35, "uniq": 1234, "human_repeat_at_1/128": 0.5,
               "human_uniq": 2000}
    _write(d / "singletoken__gpt2__spl_test__bsz_1024.json", {"metrics": metrics, "config": {}})
    _write(d / "completion__gpt2__spl_test__topk_1__topp_0.0__pfl_50__cnl_100.json", {
        "bpe_metrics": {"bpe_test/pct_repeat_1grams": 0.7, "bpe_test/pct_repeat_4grams": seq_rep_4},
        "word_metrics": {"word_test/pct_repeat_1grams": 0.6, "word_test/pct_repeat_4grams": 0.1},
        "uniq": uniq_seq, "config": {}, "completions": []})
    for step, p in steps:
        _write(d / f"singletoken__gpt2__spl_valid__bsz_1024_{step}.json", {"metrics": {"ppl": p}, "config": {}})
    return d


def test_table_rows_and_values(tmp_path):
    mle = _run_dir(tmp_path, "mle", 25.0, 0.43, 10600)
    sg = _run_dir(tmp_path, "sg", 26.5, 0.12, 13000)
    rows = collect_rows([mle, sg], ["MLE", "ScaleGrad"])
    assert [(r.run, r.decoding) for r in rows] == [("MLE", "greedy"), ("ScaleGrad", "greedy"), ("human", "-")]
    assert rows[1].values == {"seq-rep-1": 0.7, "seq-rep-4": 0.12, "uniq-seq": 13000, "ppl": 26.5,
                              "acc": 0.4, "rep": 0.6, "wrep": 0.35, "uniq": 1234}
    assert rows[2].values == {"rep": 0.5, "uniq": 2000}
    md = render(rows, "markdown").splitlines()
    assert md[0] == "| run | model | split | decoding | seq-rep-1 | seq-rep-4 | uniq-seq | ppl | acc | rep | wrep | uniq |"
    assert md[3] == "| ScaleGrad | gpt2 | test | greedy | 0.700 | 0.120 | 13000 | 26.500 | 0.400 | 0.600 | 0.350 | 1234 |"
    csv_lines = render(rows, "csv").splitlines()
    assert csv_lines[1].startswith("MLE,gpt2,test,greedy,0.700,0.430,10600,25")
    assert collect_rows([sg], view="word")[0].values["seq-rep-4"] == 0.1


def test_validation_curve_sorted_by_step(tmp_path):
    d = _run_dir(tmp_path, "run", 20.0, 0.2, 100, steps=[(200, 30.0), (100, 40.0), (300, 25.0)])
    assert validation_curve(d) == {"valid": [(100, 40.0), (200, 30.0), (300, 25.0)]}


def test_cli_writes_report_and_valid_pngs(tmp_path):
    mle = _run_dir(tmp_path, "mle", 25.0, 0.43, 10600, steps=[(10, 50.0), (20, 40.0)])
    sg = _run_dir(tmp_path, "sg", 26.5, 0.12, 13000, steps=[(10, 55.0), (20, 45.0)])
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "report_metrics.py"), str(mle), str(sg),
                           "--train-dirs", str(mle), str(sg), "--output-dir", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ScaleGrad" not in proc.stdout and "sg " in proc.stdout
    for name in ("seq_rep_vs_ppl.png", "validation_ppl.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (out / "report.md").read_text().count("\n") == 5


def test_cli_bad_input_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "report_metrics.py"), str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: result directory {tmp_path / 'nope'} does not exist"]
    assert not list(tmp_path.iterdir())
