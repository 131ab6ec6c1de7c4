"""Experiment tracking in the GPT-2 driver: ``--tensorboard-logdir`` and ``--wandb-project``.

A tiny training run writes TensorBoard event files and an offline W&B run; both are
read back by their own readers (tensorboard's EventAccumulator; the W&B run file's
records, parsed here from the LevelDB log format it uses) and compared with the
training reports the trainer made and the validation JSON files, step by step.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from scalegrad.errors import UserError
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.options import parse_args
from scalegrad.gpt2.tracking import TensorBoardSink, flat_scalars

REPO = Path(__file__).resolve().parents[1]

tensorboard = pytest.importorskip("tensorboard", reason="tensorboard reads the event files back")


def train_argv(data_base, output_dir, model_dir, *extra):
    return ["--mode", "train", "--data-base", str(data_base), "--output-dir", str(output_dir),
            "--model-load-dir", str(model_dir), "--model-name", "tiny", "--no-progress",
            "--eval-split", "valid", "--batch-size-singletoken", "200",
            "--train-batch-size", "32", "--learning-rate", "1e-3", *map(str, extra)]


def read_tensorboard(logdir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {event.step: event.value for event in acc.Scalars(tag)}
            for tag in acc.Tags()["scalars"]}


def wandb_records(path):
    """The protobuf records of a ``run-*.wandb`` file: LevelDB's log format (32 KiB
    blocks, 7-byte record headers: crc, length, type) after a 7-byte W&B header."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk
            pending = b""


def read_wandb_history(wandb_dir) -> dict[int, dict[str, float]]:
    from wandb.proto import wandb_internal_pb2

    runs = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs
    history: dict[int, dict[str, float]] = {}
    for raw in wandb_records(runs[0]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        history.setdefault(record.history.step.num, {}).update(
            {k: v for k, v in row.items() if not k.startswith("_")})
    return history


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def test_tensorboard_and_wandb_record_every_report_and_validation(
        tiny_model_dir, tiny_data_base, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    out, logdir = tmp_path / "out", tmp_path / "tb" / "run1"
    reports, seen = {}, [None]

    def on_step(trainer):  # a new report object: the trainer reported at this step
        if trainer.last_report is not seen[0]:
            seen[0] = trainer.last_report
            reports[trainer.progress.total_steps] = dict(trainer.last_report)

    run(parse_args(train_argv(tiny_data_base, out, tiny_model_dir, "--gamma", "0.5",
                              "--train-n-steps", 5, "--validate-every", 3,
                              "--report-metrics-every", 2, "--save-every", 1000,
                              "--tensorboard-logdir", logdir, "--wandb-project", "sg-test")),
        on_step=on_step)
    assert wandb.run is None  # the run was finished

    # What the run reported (the obvious route): the trainer's reports, the JSON files.
    assert sorted(reports) == [2, 4, 6]
    expected: dict[int, dict[str, float]] = {}
    for step, report in reports.items():
        assert all(isinstance(v, (int, float)) for v in report.values()), report
        expected.setdefault(step, {}).update({f"train/{k}": float(v) for k, v in report.items()})
    valid_files = sorted(out.glob("singletoken__tiny__spl_valid__bsz_200_*.json"))
    assert [int(re.search(r"_(\d+)\.json$", p.name).group(1)) for p in valid_files] == [3]
    metrics = json.loads(valid_files[0].read_text())["metrics"]
    expected[3] = {f"valid/{k}": float(v) for k, v in metrics.items()}
    assert {"train/loss", "train/ppl", "train/hits_at_1"} <= set(expected[2])
    assert {"valid/loss", "valid/ppl", "valid/repeat_at_1/128"} <= set(expected[3])

    # TensorBoard: every tag at exactly these steps, float32 values.
    scalars = read_tensorboard(logdir)
    tags = {tag for row in expected.values() for tag in row}
    assert set(scalars) == tags
    for step, row in expected.items():
        for tag, value in row.items():
            assert same(scalars[tag][step], float(np.float32(value))), (tag, step)
    for tag, by_step in scalars.items():
        assert set(by_step) == {s for s, row in expected.items() if tag in row}, tag

    # W&B: the same rows, the exact float64 values.
    history = read_wandb_history(tmp_path / "wb")
    assert set(history) == set(expected)
    for step, row in expected.items():
        assert set(history[step]) == set(row), step
        for tag, value in row.items():
            assert same(float(history[step][tag]), value), (tag, step)


@pytest.mark.parametrize("backend", ["tensorboard", "tensorboardX"])
def test_both_tensorboard_writers(backend, tmp_path):
    pytest.importorskip(backend)
    sink = TensorBoardSink(str(tmp_path / backend), backend=backend)
    sink(1, "train", {"loss": 2.5, "ppl": 5.65685424949238, "name": "text", "flag": True})
    sink(3, "valid", {"loss": 1.75, "nested": {"a": 7}})
    sink(5, "train", {"loss": float("nan"), "ppl": 4})
    sink.close()
    scalars = read_tensorboard(tmp_path / backend)
    assert set(scalars) == {"train/loss", "train/ppl", "valid/loss", "valid/nested/a"}
    assert scalars["train/loss"][1] == 2.5 and math.isnan(scalars["train/loss"][5])
    assert scalars["train/ppl"] == {1: float(np.float32(5.65685424949238)), 5: 4.0}
    assert scalars["valid/loss"] == {3: 1.75} and scalars["valid/nested/a"] == {3: 7.0}


def test_flat_scalars_keeps_numbers_only():
    import torch

    assert flat_scalars("valid", {"ppl": 3, "x": 0.5, "b": False, "s": "a", "l": [1],
                                  "t": torch.tensor(2.0), "d": {"e": 1.5, "f": "g"}}) == {
        "valid/ppl": 3.0, "valid/x": 0.5, "valid/t": 2.0, "valid/d/e": 1.5}


# --------------------------------------------------------------------------- #
# Bad input: one line, exit 2, nothing written
# --------------------------------------------------------------------------- #

def assert_one_error_line(capsys, status, *fragments):
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert captured.out == ""


def test_bad_tracking_input_ends_in_one_line(tiny_model_dir, tiny_data_base, tmp_path,
                                             capsys, monkeypatch):
    """The command line's ``main``; a package counts as missing when its import is
    blocked (``sys.modules[name] = None``, Python's way to block an import)."""
    from scalegrad.gpt2.run_gpt2 import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    cases = [
        (["--tensorboard-logdir", blocker / "tb"], (), ("--tensorboard-logdir", str(blocker),
                                                       "is a file, not a folder")),
        (["--tensorboard-logdir", blocker], (), ("--tensorboard-logdir", "is a file")),
        (["--wandb-project", "p"], ("wandb",), ("--wandb-project", "wandb",
                                                'pip install "scalegrad[tracking]"')),
        (["--tensorboard-logdir", tmp_path / "tb"], ("tensorboard", "tensorboardX"),
         ("tensorboardX", 'pip install "scalegrad[tracking]"')),
    ]
    for extra, hide, fragments in cases:
        with monkeypatch.context() as patch:
            for name in hide:
                patch.setitem(sys.modules, name, None)
            status = main(train_argv(tiny_data_base, out, tiny_model_dir, *extra))
        assert_one_error_line(capsys, status, *fragments)
        assert not out.exists() and not (tmp_path / "tb").exists()
        assert blocker.read_text() == "not a folder"
    with pytest.raises(UserError, match="--tensorboard-logdir only applies to --mode train"):
        parse_args(["--mode", "eval-singletoken", "--eval-split", "valid", "--data-base",
                    str(tiny_data_base), "--output-dir", str(out), "--tensorboard-logdir", "x"])
