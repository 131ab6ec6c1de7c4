"""scalegrad-score (docs/metrics-2022.md, "The scorer"): its numbers are the metric
functions' (and the drivers' seq-rep-N / uniq-seq), its formats, its bad inputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalegrad.metrics import CompletionMetrics, continuation_text
from scalegrad.model_metrics import logprob_coherence, mauve_score
from scalegrad.score_cli import main
from scalegrad.text_metrics import rep_n_and_diversity, score_texts
from tests import helpers
from tests.test_text_metrics import real_texts

REPO = Path(__file__).resolve().parents[1]


def write_lines(path, texts):
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return str(path)


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def featurizer_dir(tmp_path_factory, tiny_tokenizer):
    return helpers.save_tiny_model_dir(tiny_tokenizer, tmp_path_factory.mktemp("s") / "tiny-gpt2")


def one_line_texts(count, start=0):
    return [t.replace("\n", " ") for t in real_texts(count + start)[start:]]


def test_one_text_per_line(tmp_path, capsys):
    texts = one_line_texts(30)
    code, out, err = run(capsys, "--generations", write_lines(tmp_path / "g.txt", texts),
                         "--output", tmp_path / "out.json")
    assert code == 0, err
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["metrics"] == score_texts(None, texts)
    assert result["metrics"]["rep-2"] == rep_n_and_diversity(texts)["rep-2"]
    assert {"rep-2", "rep-3", "rep-4", "diversity", "gen-length", "seq-rep-4",
            "uniq-seq"} <= set(result["metrics"])
    assert result["num_prefixes"] == 30 and result["num_samples"] == 1
    header, row = out.splitlines()[:2]
    assert header.split()[:5] == ["texts", "rep-2", "rep-3", "rep-4", "diversity"]
    assert row.split()[1] == f"{result['metrics']['rep-2']:.3f}"


def test_scorer_equals_the_drivers_and_reads_result_files(tmp_path, capsys, caplog,
                                                          tiny_tokenizer, tiny_tokenizer_dir):
    """Continuations as the drivers extract them (metrics.continuation_text): the
    scorer's seq-rep-N / uniq-seq are the drivers' CompletionMetrics numbers; a
    completion result file with continuations, prefixes and references scores as the
    three text files do; one with only completions, split with --tokenizer, too."""
    prefix_ids = tiny_tokenizer(" The prefix", add_special_tokens=False)["input_ids"][:3]
    completions, continuations = [], []
    for text in one_line_texts(21):
        ids = tiny_tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        completions.append(prefix_ids + ids)
        continuations.append(continuation_text(tiny_tokenizer, prefix_ids + ids, len(prefix_ids)))
    driver = CompletionMetrics(tiny_tokenizer, len(prefix_ids))
    driver.update(completions)
    report = driver.report("valid")
    prefixes = [f"Prefix {i}." for i in range(21)]
    references = one_line_texts(21, start=30)
    code, _, err = run(capsys, "--generations", write_lines(tmp_path / "g.txt", continuations),
                       "--prefixes", write_lines(tmp_path / "p.txt", prefixes),
                       "--references", write_lines(tmp_path / "r.txt", references),
                       "--output", tmp_path / "a.json")
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    for n in range(1, 5):
        assert a["metrics"][f"seq-rep-{n}"] == report["word_metrics"][f"word_valid/pct_repeat_{n}grams"]
    assert a["metrics"]["uniq-seq"] == report["uniq"]
    assert a["human"]["rep-4"] == rep_n_and_diversity(references)["rep-4"]
    result_file = tmp_path / "completion__tiny__spl_valid__topk_1__topp_0.0__pfl_3__cnl_9.json"
    result_file.write_text(json.dumps({"completions": report["completions"],
                                       "continuations": continuations, "prefixes": prefixes,
                                       "references": references}))
    code, _, err = run(capsys, "--generations", result_file, "--output", tmp_path / "b.json")
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert (b["metrics"], b["human"]) == (a["metrics"], a["human"])
    old = tmp_path / "completion__tiny__spl_valid__topk_1__topp_0.0__pfl_3__cnl_99.json"
    old.write_text(json.dumps({"completions": report["completions"], "uniq": report["uniq"]}))
    assert len(prefix_ids) == 3
    code, _, err = run(capsys, "--generations", old, "--tokenizer", tiny_tokenizer_dir,
                       "--output", tmp_path / "c.json")
    assert code == 0, err
    assert "re-encoded" in caplog.text  # the warning
    c = json.loads((tmp_path / "c.json").read_text())
    for n in range(1, 5):
        assert c["metrics"][f"seq-rep-{n}"] == a["metrics"][f"seq-rep-{n}"]
    assert c["metrics"]["rep-4"] == a["metrics"]["rep-4"]


def test_several_samples_files_and_jsonl_agree(tmp_path, capsys):
    s1, s2, s3 = one_line_texts(12), one_line_texts(12, 12), one_line_texts(12, 24)
    files = [write_lines(tmp_path / f"s{i}.txt", s) for i, s in enumerate((s1, s2, s3))]
    code, out, err = run(capsys, "--generations", *files, "--output", tmp_path / "a.json")
    assert code == 0, err
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["num_samples"] == 3 and "+-" in out
    per = [score_texts(None, s) for s in (s1, s2, s3)]
    assert a["per_sample"] == per
    assert a["metrics"]["rep-3"] == pytest.approx(sum(p["rep-3"] for p in per) / 3)
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text("".join(json.dumps({"continuations": list(t)}) + "\n"
                             for t in zip(s1, s2, s3)))
    code, _, err = run(capsys, "--generations", jsonl, "--output", tmp_path / "b.json")
    assert code == 0, err
    b = json.loads((tmp_path / "b.json").read_text())
    assert (b["metrics"], b["std"]) == (a["metrics"], a["std"])


def test_model_metrics_through_the_scorer(tmp_path, capsys, featurizer_dir):
    gens, refs = one_line_texts(24), one_line_texts(24, 30)
    prefixes = [f"Prefix number {i} says" for i in range(24)]
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text("".join(json.dumps({"prefix": p, "continuation": g, "reference": r}) + "\n"
                             for p, g, r in zip(prefixes, gens, refs)))
    code, out, err = run(capsys, "--generations", jsonl, "--featurizer", featurizer_dir,
                         "--max-text-length", 20, "--seed", 3, "--coherence-model",
                         featurizer_dir, "--output", tmp_path / "out.json")
    assert code == 0, err
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["metrics"]["mauve"] == pytest.approx(
        mauve_score(refs, gens, featurizer_dir, max_text_length=20, seed=3), abs=1e-12)
    assert result["metrics"]["coherence"] == pytest.approx(
        logprob_coherence(prefixes, gens, featurizer_dir), abs=1e-5)
    assert result["human"]["coherence"] == pytest.approx(
        logprob_coherence(prefixes, refs, featurizer_dir), abs=1e-5)
    assert "mauve" in out.splitlines()[0]


def bad(capsys, tmp_path, *args):
    code, out, err = run(capsys, *args, "--output", tmp_path / "out.json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "out.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.json")] == []
    return err


def test_bad_inputs(tmp_path, capsys, featurizer_dir, monkeypatch):
    gens = write_lines(tmp_path / "g.txt", one_line_texts(5))
    refs = write_lines(tmp_path / "r.txt", one_line_texts(5, 5))
    err = bad(capsys, tmp_path, "--generations", gens,
              "--prefixes", write_lines(tmp_path / "p.txt", ["a", "b", "c"]))
    assert "3 prefixes but 5 generations" in err
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text('"one"\n{"continuation": "two"}\n{"continuation": 3\n')
    assert f"{jsonl} line 3: not valid JSON" in bad(capsys, tmp_path, "--generations", jsonl)
    jsonl.write_text('"one"\n{"prefix": "no continuation"}\n')
    assert f"{jsonl} line 2: no text" in bad(capsys, tmp_path, "--generations", jsonl)
    (tmp_path / "bin.txt").write_bytes(b"fine\n\xff\xfe\n")
    assert "bin.txt line 2: not UTF-8" in bad(capsys, tmp_path, "--generations",
                                              tmp_path / "bin.txt")
    err = bad(capsys, tmp_path, "--generations", gens, "--references", refs,
              "--featurizer", tmp_path / "missing-gpt2")
    assert "missing-gpt2: not found locally" in err
    err = bad(capsys, tmp_path, "--generations", write_lines(tmp_path / "one.txt", ["just one"]),
              "--references", write_lines(tmp_path / "r1.txt", ["a reference"]),
              "--featurizer", featurizer_dir)
    assert "MAUVE needs at least 2" in err
    assert "references" in bad(capsys, tmp_path, "--generations", gens, "--featurizer",
                               featurizer_dir)
    old = tmp_path / "completion__m__spl_valid__topk_1__topp_0.0__pfl_5__cnl_5.json"
    old.write_text(json.dumps({"completions": ["a b c"], "uniq": 3}))
    assert "only whole completions" in bad(capsys, tmp_path, "--generations", old)
    assert "names no prefix length" in bad(capsys, tmp_path, "--generations",
                                           write_lines(tmp_path / "x.json", ['{"completions": []}']),
                                           "--tokenizer", featurizer_dir)
    monkeypatch.setitem(sys.modules, "mauve", None)
    err = bad(capsys, tmp_path, "--generations", gens, "--references", refs,
              "--featurizer", featurizer_dir)
    assert 'pip install "scalegrad[eval]"' in err


def test_the_script_runs(tmp_path):
    gens = write_lines(tmp_path / "g.txt", one_line_texts(8))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "score_generations.py"),
                             "--generations", gens, "--output", str(tmp_path / "o.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "o.json").read_text())["metrics"]["gen-length"] == \
        pytest.approx(sum(len(t.split()) for t in one_line_texts(8)) / 8)


def test_the_flags_one_home_for_the_scorer_and_the_drivers(capsys):
    """The drivers take the same group of flags (without the scorer's short aliases,
    whose names they use for other things); a bad value fails before anything runs."""
    import argparse

    from scalegrad.errors import UserError
    from scalegrad.text_metrics import add_text_metric_arguments, text_metric_options

    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)  # a driver's own --seed stays its own
    parser.add_argument("--batch-size", type=int, default=4)
    add_text_metric_arguments(parser)
    args = parser.parse_args(["--seed", "7", "--mauve-seed", "3", "--max-text-length", "64",
                              "--coherence-model", "m", "--rep-n-unrounded"])
    options = text_metric_options(args, device="cuda")
    assert (args.seed, options.seed, options.max_text_length, options.round_digits,
            options.coherence_model, options.device, options.batch_size) == \
        (7, 3, 64, None, "m", "cuda", 8)
    with pytest.raises(UserError, match="--max-text-length must be at least 1"):
        text_metric_options(parser.parse_args(["--max-text-length", "0"]))
    code = main(["--generations", "x.txt", "--batch-size", "0"])
    assert code == 2 and "--metrics-batch-size must be at least 1" in capsys.readouterr().err
