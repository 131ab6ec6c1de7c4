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


# --------------------------------------------------------------------------- #
# The original evaluation script's files (evaluate_fairseq.py, report --eval-dirs)
# --------------------------------------------------------------------------- #

SUFFIX = ("_sg__st_40__spl_valid__pfx_2__cmpl_4__bs_cmpl_128__bs_sprd_1024__bms_1__bnb_0"
          "__tpk_1__tpp_0.0__sttpk_1__sttpp_0.0__ckst_None__ckep_None__ckpt_best")


def _original_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    # continuations: "a a a a" (1-gram repeat 3/4, 4-gram 0) and "b c b c" (1-gram 2/4, 4-gram 0)
    (directory / f"completions_{SUFFIX}.txt").write_text("x y a a a a\nx z b c b c\n")
    (directory / f"single_token_predictions_{SUFFIX}.txt").write_text("a b\nb c d\n")
    # targets cut into pieces of 4: "p q p q" and "r r r r" ("s" left over)
    (directory / f"targets_{SUFFIX}.txt").write_text("p q p q s\nr r r r\n")
    (directory / f"metrics_{SUFFIX}.json").write_text(json.dumps({
        "valid/ppl": 30.0, "valid/hits_at_1": 0.25, "valid/repeat_at_1/128": 0.5,
        "valid/wrong_repeat_at_1/128": 0.375, "valid/human_repeat_at_1/128": 0.4,
        "checkpoint_step": 40}))
    (directory / "unrelated__sg__spl_x__y.txt").write_text("ignored")


def test_original_files_parsed_as_the_original_report(tmp_path):
    from scalegrad.report import collect_original_rows, parse_original_name

    kind, model, settings = parse_original_name(f"metrics_{SUFFIX}.json")
    assert (kind, model) == ("metrics", "sg")
    assert settings["st"] == 40 and settings["tpp"] == 0.0 and settings["bs_cmpl"] == 128
    assert settings["ckst"] == "None" and settings["ckpt"] == "best"
    _original_files(tmp_path / "eval")
    rows = collect_original_rows([tmp_path / "eval"], ["sg"])
    assert [(r.run, r.model, r.split, r.decoding) for r in rows] == [
        ("sg", "sg (step 40)", "valid", "greedy"), ("human", "-", "valid", "-")]
    assert rows[0].values == {"seq-rep-1": round((0.75 + 0.5) / 2, 4), "seq-rep-4": 0.0,
                              "uniq-seq": 3, "ppl": 30.0, "acc": 0.25, "rep": 0.5,
                              "wrep": 0.375, "uniq": 4}
    assert rows[1].values == {"seq-rep-1": round((0.5 + 0.75) / 2, 4), "seq-rep-4": 0.0,
                              "uniq-seq": 4, "rep": 0.4, "uniq": 4}
    text = render(rows, "text")
    assert "uniq-seq = distinct continuation tokens" in text
    assert "legend" not in render(rows, "csv") and "distinct" not in render(rows, "csv")


def test_original_files_errors_and_cli(tmp_path):
    _original_files(tmp_path / "eval")
    (tmp_path / "eval" / f"completions_{SUFFIX.replace('cmpl_4', 'cmpl_5')}.txt").write_text("a b c\n")
    script = str(ROOT / "scripts" / "report_metrics.py")
    proc = subprocess.run([sys.executable, script, "--eval-dirs", str(tmp_path / "eval")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "line 1 has 3 tokens" in line
    (tmp_path / "eval" / f"completions_{SUFFIX.replace('cmpl_4', 'cmpl_5')}.txt").unlink()
    proc = subprocess.run([sys.executable, script, "--eval-dirs", str(tmp_path / "eval"),
                           "--format", "markdown"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| sg | sg (step 40) | valid | greedy | 0.625 | 0 | 3 | 30 | 0.250 | 0.500 | 0.375 | 4 |" in proc.stdout
    proc = subprocess.run([sys.executable, script, "--eval-dirs", str(tmp_path / "eval"),
                           "--model-names", "nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "no evaluation files of model 'nope'" in proc.stderr
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: give RUN_DIRs")


@pytest.mark.parametrize("case", ["train-names", "no-plot", "no-curves", "file"])
def test_cli_output_dir_mistake_writes_nothing(tmp_path, case):
    """A mistake found while writing --output-dir is one error line with nothing written."""
    run = _run_dir(tmp_path, "mle", 25.0, 0.43, 10600, steps=[(10, 50.0)])
    out = tmp_path / "report"
    extra = {"train-names": ["--train-dirs", str(run), "--train-names", "a", "b"],
             "no-plot": [], "no-curves": ["--train-dirs", str(tmp_path / "empty")],
             "file": []}[case]
    if case == "no-plot":  # single-token results only: nothing to plot seq-rep-4 against
        (run / "completion__gpt2__spl_test__topk_1__topp_0.0__pfl_50__cnl_100.json").unlink()
    if case == "file":
        out.write_text("x")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "report_metrics.py"), str(run),
                           "--output-dir", str(out), *extra], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""
    if case == "file":
        assert out.read_text() == "x"
    else:
        assert not out.exists()


def test_original_default_models_one_row_each_when_a_name_prefixes_another(tmp_path):
    """Without --model-names every model found is reported once, even when one model's
    name begins with another's (the glob *__sg*__ also matches sg0.2's files)."""
    from scalegrad.report import collect_original_rows

    _original_files(tmp_path / "eval")
    for path in list((tmp_path / "eval").glob("*_sg__st_*")):
        path.with_name(path.name.replace("_sg__", "_sg0.2__")).write_text(path.read_text())
    rows = collect_original_rows([tmp_path / "eval"])
    assert [(r.run, r.model) for r in rows] == [("sg", "sg (step 40)"), ("sg0.2", "sg0.2 (step 40)"),
                                                ("human", "-")]
    # Named explicitly, a name keeps the original report's glob (a prefix takes in both).
    rows = collect_original_rows([tmp_path / "eval"], ["sg"])
    assert sorted((r.run, r.model) for r in rows) == [("human", "-"), ("sg", "sg (step 40)"),
                                                      ("sg", "sg0.2 (step 40)")]
