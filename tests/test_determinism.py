"""Determinism: the same seed on the CPU gives the same loss curve, the same
weights and the same completions, run twice (issue 7)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegrad.data import load_split, save_split, split_path
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.options import parse_args


@pytest.fixture(scope="module")
def small_data(tiny_data_base, tmp_path_factory):
    path = tmp_path_factory.mktemp("det_data")
    for split, size in {"train": 1500, "valid": 1300, "test": 1300}.items():
        save_split(load_split(split_path(tiny_data_base, split))[:size], split_path(path, split))
    return path


def _train(model_dir, data, out, seed):
    curve = []
    argv = ["--mode", "train", "--data-base", str(data), "--output-dir", str(out),
            "--model-load-dir", str(model_dir), "--model-name", "tiny", "--no-progress",
            "--eval-split", "valid", "--batch-size-singletoken", "200", "--validate-every", "20",
            "--train-batch-size", "32", "--learning-rate", "1e-3", "--gamma", "0.5",
            "--train-n-steps", "30", "--seed", str(seed), "--enable-dropout"]
    run(parse_args(argv), on_step=lambda trainer: curve.append(trainer.progress.epoch_loss))
    return curve, load_file(str(Path(out) / "model.safetensors"))


def _complete(model_dir, data, out, top_k):
    argv = ["--mode", "eval-completion", "--data-base", str(data), "--output-dir", str(out),
            "--model-load-dir", str(model_dir), "--model-name", "tiny", "--no-progress",
            "--eval-split", "test", "--batch-size-completion", "120", "--prefix-length", "20",
            "--continuation-length", "15", "--top-k", str(top_k), "--seed", "3"]
    run(parse_args(argv))
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("completion__*.json"))]


def test_same_seed_same_curve_weights_and_completions(tiny_model_dir, small_data, tmp_path):
    curve_a, weights_a = _train(tiny_model_dir, small_data, tmp_path / "a", seed=5)
    curve_b, weights_b = _train(tiny_model_dir, small_data, tmp_path / "b", seed=5)
    assert len(curve_a) == 31 and curve_a == curve_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # Another seed draws another chunk order (and dropout masks): another curve.
    curve_c, _ = _train(tiny_model_dir, small_data, tmp_path / "c", seed=6)
    assert curve_c != curve_a

    for top_k in (1, 5):
        first = _complete(tmp_path / "a", small_data, tmp_path / f"ca{top_k}", top_k)
        second = _complete(tmp_path / "a", small_data, tmp_path / f"cb{top_k}", top_k)
        assert first and first == second
