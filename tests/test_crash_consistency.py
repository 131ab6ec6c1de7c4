"""Fault injection (``docs/failure-behaviour.md``): real ``run_gpt2.py`` runs killed with
``os._exit`` at every file-system step of a checkpoint write, of the best model's
write and of a result file's write, then resumed (``tests/crash_worker.py`` does the
runs, in child processes of one subprocess).

After each kill the newest complete copy of ``resume/`` and ``best/`` is findable
(the new one as soon as the write's first rename is done), and each resumed run ends
bit-equal to an uninterrupted one with no temporary name left anywhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_run_gpt2_train import (assert_same_weights, json_files,  # noqa: F401 (a fixture)
                                       short_data_base)

REPO = Path(__file__).resolve().parents[1]
LEFTOVER = re.compile(r"^\..+\.(tmp|new|old)-")

FLAGS = ["--train-n-steps", 7, "--validate-every", 2, "--save-every", 3,
         "--report-metrics-every", 2, "--gamma", 0.5]
# Steps 1..8: validations (result files, new bests) at 2, 4, 6; checkpoints at 3 and 6,
# and the last one when the run finishes. The second of each write is killed.
RESULT_2, RESULT_4 = ("singletoken__tiny__spl_valid__bsz_200_2.json",
                      "singletoken__tiny__spl_valid__bsz_200_4.json")


def argv(data_base, model_dir, mode="train", *extra):
    return [str(a) for a in ["--mode", mode, "--data-base", data_base, "--model-load-dir", model_dir,
                             "--model-name", "tiny", "--no-progress", "--eval-split", "valid",
                             "--batch-size-singletoken", 200, "--train-batch-size", 32,
                             "--learning-rate", "1e-3", *extra]]


@pytest.fixture(scope="module")
def crashes(tiny_model_dir, short_data_base, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("crashes")
    plan = {"root": str(root), "argv": argv(short_data_base, tiny_model_dir, "train", *FLAGS),
            "targets": [["resume", "resume", 2, ["--resume"]], ["best", "best", 2, ["--resume"]],
                        ["result", "result", 2, ["--resume"]],
                        ["eval", "eval-result", 1, [],
                         argv(short_data_base, tiny_model_dir, "eval-singletoken")]]}
    (root / "plan.json").write_text(json.dumps(plan))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "crash_worker.py"),
                           str(root / "plan.json")], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, json.loads((root / "result.json").read_text())


def leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if LEFTOVER.match(p.name)]


def calls_done(run) -> int:
    return run["k"] if run["when"] == "after" else run["k"] - 1


def first_rename(calls, name) -> int:
    """1-based index of the write's first rename (``.NAME.tmp-*`` -> ``.NAME.new-*``)."""
    return next(i for i, (function, source, target) in enumerate(calls, 1)
                if function == "replace" and source.startswith(f".{name}.tmp-")
                and target.startswith(f".{name}.new-"))


def assert_resumed(out: Path) -> None:
    """The rerun continued from a checkpoint (one of the two complete ones), not afresh."""
    log = (out.parent / f"{out.name}.log").read_text()
    assert "resumed from" in log and "starting afresh" not in log, log[-2000:]


def assert_like_the_reference(out: Path, reference: Path) -> None:
    for folder in ("", "resume", "best"):
        assert_same_weights(reference / folder, out / folder)
    assert json_files(out) == json_files(reference)
    assert json_files(out / "best") == json_files(reference / "best")
    state = torch.load(out / "resume" / "training_state.pt", weights_only=True)
    expected = torch.load(reference / "resume" / "training_state.pt", weights_only=True)
    assert state["progress"] == expected["progress"]
    for a, b in zip(state["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert not leftovers(out), leftovers(out)


@pytest.mark.slow
def test_every_kill_point_of_a_checkpoint_write(crashes):
    root, result = crashes
    assert result["reference"]["reference"] == 0
    target = result["targets"]["resume"]
    calls = target["calls"]
    # The folder swap, then each top-level model file linked and renamed into place.
    renamed = first_rename(calls, "resume")
    assert [c[0] for c in calls[renamed - 1:renamed + 2]] == ["replace"] * 3
    assert calls[renamed][1] == "resume" and calls[renamed + 1][2] == "resume"
    assert len(target["runs"]) == len(calls) + 1  # before the first call, after each
    for run in target["runs"]:
        assert run["status"] == 137 and run["rerun_status"] == 0, run
        newest = run["crashed"]
        assert newest["resume_has_model"]
        assert newest["resume_steps"] == (6 if calls_done(run) >= renamed else 3), run
        assert_resumed(Path(run["out"]))
        assert_like_the_reference(Path(run["out"]), root / "reference")


@pytest.mark.slow
def test_every_kill_point_of_the_best_model_write(crashes):
    root, result = crashes
    target = result["targets"]["best"]
    calls = target["calls"]
    renamed = first_rename(calls, "best")
    assert calls[0][0] == "copy2" and len(target["runs"]) == len(calls) + 1
    for run in target["runs"]:
        assert run["status"] == 137 and run["rerun_status"] == 0, run
        expected = [RESULT_2, RESULT_4] if calls_done(run) >= renamed else [RESULT_2]
        assert run["crashed"]["best_results"] == expected, run
        assert_resumed(Path(run["out"]))
        assert_like_the_reference(Path(run["out"]), root / "reference")


@pytest.mark.slow
def test_every_kill_point_of_a_result_file_write(crashes):
    root, result = crashes
    for name, reference in (("result", "reference"), ("eval", "reference-eval")):
        target = result["targets"][name]
        assert [c[0] for c in target["calls"]] == ["replace"]  # a file: one rename
        assert len(target["runs"]) == 2
        for run in target["runs"]:
            assert run["status"] == 137 and run["rerun_status"] == 0, run
            out = Path(run["out"])
            if name == "result":
                written = RESULT_4 in run["crashed"]["results"]
                assert written == (calls_done(run) >= 1), run
                assert_resumed(out)
                assert_like_the_reference(out, root / reference)
            else:
                assert json_files(out) == json_files(root / reference) and len(json_files(out)) == 1
                assert not leftovers(out), leftovers(out)
        crashed_tree = target["runs"][0]["crashed"]["tree"]
        assert any(LEFTOVER.match(Path(p).name) for p in crashed_tree)  # the kill left one ...


def test_a_model_folder_whose_swap_was_interrupted_is_read_from_its_complete_copy(
        tiny_model_dir, tmp_path, caplog):
    """State after step 2 of a folder write: no ``best/``, its new copy in ``.best.new-*``."""
    import shutil

    from scalegrad.gpt2.runtime import load_model

    shutil.copytree(tiny_model_dir, tmp_path / ".best.new-00000000000000000002-bbbbbb")
    (tmp_path / ".best.old-00000000000000000002-bbbbbb").mkdir()
    with caplog.at_level("WARNING"):
        model = load_model(str(tmp_path / "best"), flag="--model-load-dir")
    assert "reading the complete copy" in caplog.text and ".best.new-" in caplog.text
    assert model.config.vocab_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".best.new-00000000000000000002-bbbbbb", ".best.old-00000000000000000002-bbbbbb"]
