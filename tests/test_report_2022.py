"""The report's 2022 columns (docs/metrics-2022.md, "In the report"): read from a
completion result's ``text_metrics``, mean +- std over samples, the human row, and the
diversity-against-MAUVE plot."""

import json

import pytest

from scalegrad.cli import report_main
from scalegrad.report import collect_rows, render
from scalegrad.text_metrics import TextMetricOptions, score_samples
from tests import helpers
from tests.test_score import one_line_texts

SINGLETOKEN = {"loss": 4.0, "ppl": 20.0, "hits_at_1": 0.4, "repeat_at_1/128": 0.6,
               "wrong_repeat_at_1/128": 0.35, "uniq": 1234, "human_repeat_at_1/128": 0.5,
               "human_uniq": 2000}


def run_dir(tmp_path, name, text_metrics):
    d = tmp_path / name
    d.mkdir()
    (d / "singletoken__gpt2__spl_test__bsz_1024.json").write_text(
        json.dumps({"metrics": SINGLETOKEN, "config": {}}))
    result = {"bpe_metrics": {"bpe_test/pct_repeat_1grams": 0.7, "bpe_test/pct_repeat_4grams": 0.2},
              "word_metrics": {}, "uniq": 99, "config": {}, "completions": []}
    if text_metrics is not None:
        result["text_metrics"] = text_metrics
    (d / "completion__gpt2__spl_test__topk_40__topp_0.0__pfl_5__cnl_20.json").write_text(
        json.dumps(result))
    return d


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_tokenizer):
    featurizer = helpers.save_tiny_model_dir(tiny_tokenizer,
                                             tmp_path_factory.mktemp("r") / "tiny-gpt2")
    options = TextMetricOptions(featurizer=featurizer, max_text_length=16)
    refs = one_line_texts(20, 40)
    several = score_samples(None, [one_line_texts(20), one_line_texts(20, 20)], refs, options)
    one = score_samples(None, [one_line_texts(20, 10)], refs, options)
    return several, one


def test_columns_std_and_human_row(tmp_path, scored):
    several, one = scored
    rows = collect_rows([run_dir(tmp_path, "sg", several), run_dir(tmp_path, "mle", one),
                         run_dir(tmp_path, "old", None)])
    sg, mle, old, human = rows
    for column in ("rep-2", "rep-3", "rep-4", "diversity", "gen-length", "mauve"):
        assert sg.values[column] == several["metrics"][column]
        assert sg.std[column] == several["std"][column]
        assert mle.values[column] == one["metrics"][column] and column not in mle.std
    assert sg.values["seq-rep-4"] == 0.2  # today's column keeps the BPE view
    assert "rep-2" not in old.values
    assert human.values["rep"] == 0.5 and human.values["rep-4"] == several["human"]["rep-4"]
    assert "mauve" not in human.values
    markdown = render(rows, "markdown").splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    assert header[-6:] == ["rep-2", "rep-3", "rep-4", "diversity", "gen-length", "mauve"]
    cells = [c.strip() for c in markdown[2].strip("|").split("|")]
    assert cells[header.index("mauve")] == \
        f"{several['metrics']['mauve']:.3f} +- {several['std']['mauve']:.3f}"
    csv_header = render(rows, "csv").splitlines()[0].split(",")
    assert "mauve std" in csv_header and "rep-2 std" in csv_header
    # Without text_metrics anywhere: today's table, unchanged.
    assert "rep-2" not in render(collect_rows([tmp_path / "old"]), "markdown")


def test_report_writes_the_diversity_mauve_plot(tmp_path, scored, capsys):
    several, one = scored
    out = tmp_path / "report"
    code = report_main([str(run_dir(tmp_path, "sg", several)), str(run_dir(tmp_path, "mle", one)),
                        "--output-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    data = (out / "diversity_vs_mauve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert "diversity_vs_mauve.png" in capsys.readouterr().out
