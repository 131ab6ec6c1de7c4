"""run_gpt2.py's --penalty-alpha (contrastive search) and --num-samples, and the 2022
papers' columns in its completion result files (docs/contrastive-search.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scalegrad.data import load_split, save_split, split_path
from scalegrad.errors import UserError
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.options import parse_args
from scalegrad.metrics import continuation_text
from scalegrad.text_metrics import score_samples
from tests.test_contrastive_search import plain_contrastive
from tests.test_run_gpt2 import SCRIPT, base_argv, load_model

COMMON = ["--mode", "eval-completion", "--eval-split", "valid", "--batch-size-completion", 40,
          "--prefix-length", 8, "--continuation-length", 6]


@pytest.fixture(scope="module")
def data_base(tiny_data_base, tmp_path_factory):
    """A few chunks of 41 tokens: 5 prefixes of 8 each."""
    path = tmp_path_factory.mktemp("decoding_data")
    for split, size in {"train": 500, "valid": 130, "test": 130}.items():
        save_split(load_split(split_path(tiny_data_base, split))[:size], split_path(path, split))
    return str(path)


def evaluate(data_base, out, model_dir, *extra):
    result = run(parse_args(base_argv(data_base, out, model_dir, *COMMON, *map(str, extra))))
    (path,) = result.files
    return path, json.loads(open(path).read())


def decode(tokenizer, ids):
    from scalegrad.metrics import decode_text

    return decode_text(tokenizer, ids)


def test_contrastive_search_in_the_driver(tiny_model_dir, tiny_tokenizer, data_base, tmp_path):
    path, result = evaluate(data_base, tmp_path / "out", tiny_model_dir, "--penalty-alpha", 0.6,
                            "--top-k", 4, "--completion-batch-size", 3)
    assert path.endswith("completion__tiny__spl_valid__topk_4__topp_0.0__pfl_8__cnl_6__alpha_0.6.json")
    assert result["decoding"] == {"contrastive_search": True, "penalty_alpha": 0.6, "top_k": 4}
    model = load_model(tiny_model_dir)
    chunks = load_split(split_path(data_base, "valid"))[:123].view(3, 41)
    expected = []
    for chunk in chunks:
        for start in range(0, 40, 8):
            prefix = chunk[start:start + 8].tolist()
            expected.append(prefix + plain_contrastive(model, prefix, 6, 0.6, 4))
    assert result["completions"] == [decode(tiny_tokenizer, ids) for ids in expected]


def test_papers_columns_and_human_row(tiny_model_dir, tiny_tokenizer, data_base, tmp_path):
    _, result = evaluate(data_base, tmp_path / "out", tiny_model_dir)
    tokens = load_split(split_path(data_base, "valid"))[:123]
    model = load_model(tiny_model_dir)
    prefixes, continuations, references = [], [], []
    with torch.no_grad():
        for c in range(3):
            for w in range(5):
                start = c * 41 + w * 8
                ids = tokens[start:start + 8]
                prefixes.append(decode(tiny_tokenizer, ids.tolist()))
                out = model.generate(ids[None], max_new_tokens=6, min_new_tokens=6, do_sample=False)
                continuations.append(continuation_text(tiny_tokenizer, out[0].tolist(), 8))
                # the true continuation runs on into the next chunk; the last ends early
                references.append(decode(tiny_tokenizer, tokens[start + 8:start + 14].tolist()))
    assert result["prefixes"] == prefixes and result["continuations"] == continuations
    assert result["references"] == references
    metrics = result["text_metrics"]
    expected = score_samples(prefixes, [continuations], references)
    for key in ("metrics", "human", "num_samples", "num_prefixes"):
        assert metrics[key] == expected[key], key
    assert {"rep-2", "rep-3", "rep-4", "diversity", "gen-length"} <= set(metrics["metrics"])
    assert metrics["seeds"] == [42] and "std" not in metrics


def test_num_samples_seeds_reproduce(tiny_model_dir, data_base, tmp_path):
    path, result = evaluate(data_base, tmp_path / "many", tiny_model_dir, "--top-k", 5,
                            "--num-samples", 3, "--seed", 7)
    assert path.endswith("__topk_5__topp_0.0__pfl_8__cnl_6__samples_3.json")
    assert result["decoding"] == {"top_k": 5, "top_p": 0.0, "seed": 7, "seeds": [7, 8, 9]}
    samples = result["samples"]
    assert [s["seed"] for s in samples] == [7, 8, 9]
    for i, seed in enumerate([7, 8, 9]):
        _, alone = evaluate(data_base, tmp_path / f"one{i}", tiny_model_dir, "--top-k", 5,
                            "--seed", seed)
        assert samples[i]["completions"] == alone["completions"]
        assert samples[i]["bpe_metrics"] == alone["bpe_metrics"]
        assert result["text_metrics"]["per_sample"][i] == alone["text_metrics"]["metrics"]
    # the original keys are the first sample's; the samples differ
        assert result["continuations"][i] == alone["continuations"]
    assert result["completions"] == samples[0]["completions"]
    assert samples[0]["completions"] != samples[1]["completions"]
    # scalegrad-score on the result file gives the driver's numbers
    from scalegrad.score_cli import main as score_main

    assert score_main(["--generations", path, "--output", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    for key in ("metrics", "std", "per_sample", "human"):
        assert scores[key] == result["text_metrics"][key], key
    # mean and std over the samples, of the papers' columns and of the original metrics
    reps = [s["rep-2"] for s in result["text_metrics"]["per_sample"]]
    mean = sum(reps) / 3
    assert result["text_metrics"]["metrics"]["rep-2"] == pytest.approx(mean)
    assert result["text_metrics"]["std"]["rep-2"] == pytest.approx(
        (sum((r - mean) ** 2 for r in reps) / 3) ** 0.5)
    key = "bpe_valid/pct_repeat_4grams"
    values = [s["bpe_metrics"][key] for s in samples]
    assert result["sample_statistics"]["mean"][key] == pytest.approx(sum(values) / 3)
    assert result["sample_statistics"]["mean"]["uniq"] == pytest.approx(
        sum(s["uniq"] for s in samples) / 3)


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "3"], "greedy decoding (--top-k 1 --top-p 0) gives one continuation"),
    (["--num-samples", "0", "--top-k", "5"], "--num-samples must be at least 1"),
    (["--penalty-alpha", "1.5", "--top-k", "4"], "--penalty-alpha must be between 0 and 1"),
    (["--penalty-alpha", "-0.2", "--top-k", "4"], "--penalty-alpha must be between 0 and 1"),
    (["--penalty-alpha", "0.6"], "--penalty-alpha needs --top-k K > 1"),
    (["--penalty-alpha", "0.6", "--top-k", "4", "--top-p", "0.9"], "takes no --top-p"),
    (["--penalty-alpha", "0.6", "--top-k", "4", "--num-samples", "2"], "deterministic"),
])
def test_bad_flags(tiny_model_dir, data_base, tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(parse_args(base_argv(data_base, out, tiny_model_dir, *COMMON, *extra)))
    assert not out.exists()


def test_script_says_one_line_and_exits_2(tiny_model_dir, data_base, tmp_path):
    out = tmp_path / "out"
    argv = base_argv(data_base, out, tiny_model_dir, *COMMON, "--penalty-alpha", "2", "--top-k", "4")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: --penalty-alpha must be between 0 and 1, got 2.0"], proc.stderr
    assert not out.exists()


def test_report_reads_contrastive_and_sample_files(tiny_model_dir, data_base, tmp_path):
    from scalegrad.report import collect_rows

    out = tmp_path / "run"
    _, contrastive = evaluate(data_base, out, tiny_model_dir, "--penalty-alpha", 0.5, "--top-k", 3)
    _, sampled = evaluate(data_base, out, tiny_model_dir, "--top-p", 0.9, "--num-samples", 2)
    rows = {row.decoding: row for row in collect_rows([out]) if row.run == "run"}
    assert set(rows) == {"contrastive, alpha 0.5, top-k 3", "top-p 0.9, 2 samples"}
    assert rows["top-p 0.9, 2 samples"].values["rep-2"] == pytest.approx(
        sampled["text_metrics"]["metrics"]["rep-2"])
    assert rows["top-p 0.9, 2 samples"].std["rep-2"] == pytest.approx(
        sampled["text_metrics"]["std"]["rep-2"])
    assert rows["contrastive, alpha 0.5, top-k 3"].values["diversity"] == pytest.approx(
        contrastive["text_metrics"]["metrics"]["diversity"])
