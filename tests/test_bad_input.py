"""Every bad input of issue 21's table: one ``error:`` line, exit status 2, nothing
written; and the GPT-2 driver checks only what the run uses (``docs/failure-behaviour.md``).

The commands' ``main`` functions run in-process (the console scripts call them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scalegrad.cli import prepare_data_main, report_main
from tests import helpers
from tests.test_run_gpt2_train import short_data_base  # noqa: F401 (a fixture)


def one_error_line(capsys, *fragments) -> str:
    captured = capsys.readouterr()
    # transformers' own progress bars ("Loading weights") may come before it.
    lines = [line for line in captured.err.strip().splitlines() if "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def run_dir(root: Path) -> Path:
    """A result folder of run_gpt2.py with one single-token and one completion file."""
    folder = root / "run"
    folder.mkdir(parents=True)
    (folder / "singletoken__m__spl_valid__bsz_8.json").write_text(json.dumps(
        {"metrics": {"ppl": 3.0, "hits_at_1": 0.5}, "config": {}}))
    (folder / "completion__m__spl_valid__topk_1__topp_0.0__pfl_4__cnl_4.json").write_text(json.dumps(
        {"bpe_metrics": {"bpe_valid/pct_repeat_4grams": 0.1}, "word_metrics": {}, "uniq": 3}))
    return folder


# --------------------------------------------------------------------------- #
# scalegrad-report
# --------------------------------------------------------------------------- #

def test_report_output_dir_under_a_file(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    run = run_dir(tmp_path)
    assert report_main([str(run), "--output-dir", str(a_file / "rep")]) == 2
    one_error_line(capsys, "--output-dir", "a_file is a file, not a folder")
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("kind, content, part", [
    ("singletoken", [1, 2, 3], "'metrics'"),
    ("singletoken", {}, "'metrics'"),
    ("singletoken", {"metrics": [1]}, "'metrics'"),
    ("completion", {}, "'bpe_metrics'"),
])
def test_report_result_files_of_another_shape(tmp_path, capsys, kind, content, part):
    run = run_dir(tmp_path)
    name = next(run.glob(f"{kind}__*.json")).name
    (run / name).write_text(json.dumps(content))
    out = tmp_path / "out"
    assert report_main([str(run), "--output-dir", str(out)]) == 2
    one_error_line(capsys, name, part)
    assert capsys.readouterr().out == "" and not out.exists()


def test_report_eval_dirs_without_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_main(["--eval-dirs", str(tmp_path / "empty")]) == 2
    one_error_line(capsys, "no evaluation files", str(tmp_path / "empty"))


def test_report_train_names_count_without_output_dir(tmp_path, capsys):
    run = run_dir(tmp_path)
    assert report_main([str(run), "--train-dirs", str(run), str(run), "--train-names", "X"]) == 2
    one_error_line(capsys, "--train-names gives 1 names for 2 --train-dirs entries")
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- #
# scalegrad-prepare-data
# --------------------------------------------------------------------------- #

@pytest.fixture()
def text_file(tmp_path):
    from scalegrad.data import default_corpus_text

    text = default_corpus_text()
    path = tmp_path / "corpus.txt"
    path.write_text(text[: text.index("\n\n", 20_000) + 2], encoding="utf-8")
    return path


def test_prepare_data_output_dir_under_a_file(tmp_path, capsys, text_file, tiny_tokenizer_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    argv = ["--input", str(text_file), "--tokenizer", tiny_tokenizer_dir]
    assert prepare_data_main(argv + ["--output-dir", str(a_file / "out")]) == 2
    one_error_line(capsys, "--output-dir", "a_file is a file, not a folder")
    assert a_file.read_text() == "x"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_prepare_data_output_dir_that_cannot_be_created(tmp_path, capsys, text_file,
                                                        tiny_tokenizer_dir):
    argv = ["--input", str(text_file), "--tokenizer", tiny_tokenizer_dir, "--train-tokenizer",
            "--vocab-size", "300"]
    assert prepare_data_main(argv + ["--output-dir", "/proc/scalegrad-x"]) == 2
    one_error_line(capsys, "--output-dir /proc/scalegrad-x")
    assert not os.path.exists("/proc/scalegrad-x")


def test_prepare_data_bin_under_a_file_writes_no_split(tmp_path, capsys, text_file,
                                                       tiny_tokenizer_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    assert prepare_data_main(["--input", str(text_file), "--tokenizer", tiny_tokenizer_dir,
                              "--output-dir", str(out), "--fairseq-data-bin",
                              str(a_file / "bin")]) == 2
    message = one_error_line(capsys)
    assert "--fairseq-data-bin" in message or "needs fairseq" in message
    assert not out.exists() and a_file.read_text() == "x"


def test_prepare_data_a_failed_data_bin_leaves_no_split_nor_tokenizer(
        tmp_path, capsys, text_file, monkeypatch):
    """fairseq-preprocess fails (here: told so) after the splits and tokenizer are made."""
    from scalegrad import data
    from scalegrad.errors import UserError

    def failing(*args, **kwargs):
        raise UserError("fairseq-preprocess failed: told to")

    monkeypatch.setattr(data, "fairseq_available", lambda: True)
    monkeypatch.setattr(data, "write_fairseq_data_bin", failing)
    out = tmp_path / "out"
    assert prepare_data_main(["--input", str(text_file), "--train-tokenizer", "--vocab-size", "300",
                              "--output-dir", str(out), "--fairseq-data-bin",
                              str(tmp_path / "bin")]) == 2
    one_error_line(capsys, "fairseq-preprocess failed")
    assert not out.exists()


# --------------------------------------------------------------------------- #
# scalegrad-run-gpt2: only what the run uses is checked
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def model_256(tiny_tokenizer, tmp_path_factory):
    """The tiny model with 256 positions (the issue's: shorter than the default
    --batch-size-singletoken 1024) and its tokenizer."""
    path = tmp_path_factory.mktemp("model_256") / "model"
    model = helpers.build_tiny_model(len(tiny_tokenizer), n_positions=256,
                                     eos_token_id=tiny_tokenizer.eos_token_id)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def gpt2_train_argv(data_base, out, model, *extra):
    return ["--mode", "train", "--data-base", str(data_base), "--output-dir", str(out),
            "--model-load-dir", model, "--model-name", "tiny", "--no-progress",
            "--train-batch-size", "32", *map(str, extra)]


def test_training_without_validation_checks_no_validation_flag(short_data_base, model_256,  # noqa: F811
                                                               tmp_path, capsys):
    from scalegrad.gpt2.run_gpt2 import main

    out = tmp_path / "out"
    # No --eval-split, --batch-size-singletoken 1024 > 256 positions: neither is used.
    assert main(gpt2_train_argv(short_data_base, out, model_256, "--train-n-steps", 0)) == 0
    stdout = capsys.readouterr().out
    assert "best validation" not in stdout and "no best model" in stdout, stdout
    assert f"the last model is in {out} (resumable from {out / 'resume'})" in stdout
    assert not (out / "best").exists() and (out / "model.safetensors").is_file()
    assert not list(out.glob("singletoken__*"))

    # A run that validates needs --eval-split, and then the single-token chunk must fit.
    assert main(gpt2_train_argv(short_data_base, tmp_path / "v", model_256, "--validate-every", 2)) == 2
    one_error_line(capsys, "validates every 2 steps", "--eval-split")
    assert main(gpt2_train_argv(short_data_base, tmp_path / "v", model_256, "--validate-every", 2,
                                "--eval-split", "valid")) == 2
    one_error_line(capsys, "--batch-size-singletoken 1024 is longer than the model's 256 positions")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("every, steps, epochs, exact, expected", [
    (2, 7, 1, False, True), (8, 7, 1, False, False), (1, 0, 3, False, False),
    (5, 3, 2, False, True), (4, 3, 2, False, False), (3, 3, 2, False, True),
    (4, 4, 1, True, True), (5, 4, 1, True, False), (10000, 10000, 1, False, False),
])
def test_plan_validates_exactly_when_a_step_validates(every, steps, epochs, exact, expected):
    """Plan.validates against a walk through the loop's steps (trainer._one_step's rules)."""
    from argparse import Namespace

    from scalegrad.gpt2.plan import make_plan

    args = Namespace(validate_every=every, train_n_steps=steps, num_train_epochs=epochs,
                     exact_train_n_steps=exact, max_steps=-1, gradient_accumulation_steps=None,
                     train_batch_size=32)
    plan = make_plan(args, 18, 1)
    total, validated = 0, False
    for _epoch in range(plan.num_epochs):
        for step in range(plan.steps_in_epoch(args)):
            if exact and total >= steps:
                break
            total += 1
            if not exact and step == steps:
                break  # the epoch ends before validating (the original's quirk)
            validated |= total % every == 0
    assert validated == expected
    assert plan.validates(args) == expected


# --------------------------------------------------------------------------- #
# scalegrad-evaluate-fairseq
# --------------------------------------------------------------------------- #

def test_evaluate_fairseq_garbage_checkpoint_says_what_is_wrong(tmp_path, capsys):
    pytest.importorskip("fairseq")
    from scalegrad.fairseq_plugin.eval_cli import main

    models = tmp_path / "models"
    models.mkdir()
    (models / "checkpoint_best.pt").write_bytes(b"e" * 101)
    (tmp_path / "data").mkdir()
    assert main(["--data-dir", str(tmp_path / "data"), "--model-path", str(models),
                 "--save-path", str(tmp_path / "out"), "--no-progress"]) == 2
    one_error_line(capsys, "checkpoint_best.pt cannot be read",
                   "not a file written by torch.save", "truncated or corrupt")
    assert not (tmp_path / "out").exists()
