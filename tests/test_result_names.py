"""Two holes a mutation test of the suite found (issue 21), each closed by a fast test:

* the fairseq evaluation's result names with ``--ckpt step --ckpt-step N`` and
  ``--ckpt epoch --ckpt-epoch N`` (swapping the two values in the suffix passed every test);
* the ``--eval-dirs`` report's human row from target lines of several pieces each (a
  sliding window instead of consecutive pieces was caught only by a slow test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SUFFIX = ("_sg__st_40__spl_valid__pfx_2__cmpl_4__bs_cmpl_128__bs_sprd_1024__bms_1__bnb_0"
          "__tpk_1__tpp_0.0__sttpk_1__sttpp_0.0__ckst_None__ckep_None__ckpt_best")


def seq_rep_1(piece):
    return 1 - len(set(piece)) / len(piece)


def test_report_human_row_takes_consecutive_pieces_of_each_target_line(tmp_path):
    from scalegrad.report import collect_original_rows

    lines = ["p q p q r r r r s".split(), "t t t t u v w x".split(), "a b c d a a a a".split()]
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / f"completions_{SUFFIX}.txt").write_text("x y a a a a\n")
    (folder / f"single_token_predictions_{SUFFIX}.txt").write_text("a b\n")
    (folder / f"targets_{SUFFIX}.txt").write_text("\n".join(" ".join(line) for line in lines) + "\n")
    (folder / f"metrics_{SUFFIX}.json").write_text(json.dumps({"valid/ppl": 3.0, "checkpoint_step": 40}))
    consecutive = [line[i * 4:(i + 1) * 4] for line in lines for i in range(len(line) // 4)]
    sliding = [line[i:i + 4] for line in lines for i in range(len(line) // 4)]
    assert consecutive[:2] == [list("pqpq"), list("rrrr")] and len(consecutive) == 6
    expected = sum(map(seq_rep_1, consecutive)) / len(consecutive)
    assert abs(expected - sum(map(seq_rep_1, sliding)) / len(sliding)) > 0.1  # they tell apart
    [_, human] = collect_original_rows([folder])
    assert human.run == "human"
    assert human.values["seq-rep-1"] == pytest.approx(round(expected, 4))
    assert human.values["seq-rep-4"] == 0.0
    assert human.values["uniq-seq"] == len({token for line in lines for token in line}) == 13


# --------------------------------------------------------------------------- #
# --ckpt step / --ckpt epoch on real (untrained) fairseq checkpoints
# --------------------------------------------------------------------------- #

TINY_LM = ["--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2",
           "--tokens-per-sample", "64", "--cpu", "--seed", "1", "--dropout", "0"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A data-bin made by fairseq-preprocess (in-process) and four checkpoints of a tiny
    transformer_lm in fairseq's format, two named by step and two by epoch."""
    pytest.importorskip("fairseq")
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import preprocess
    from omegaconf import OmegaConf
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("ckpt_names")
    lines = [line.strip() for line in topics["if"].splitlines() + topics["while"].splitlines()
             if line.strip()]
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "valid.txt").write_text("\n".join(lines[:12]) + "\n")
    data_bin = root / "bin"
    preprocess.main(options.get_preprocessing_parser().parse_args(
        ["--only-source", "--trainpref", str(root / "train.txt"), "--validpref",
         str(root / "valid.txt"), "--destdir", str(data_bin), "--workers", "1"]))
    args = options.parse_args_and_arch(options.get_training_parser(), [str(data_bin), *TINY_LM])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    models = root / "models"
    models.mkdir()
    for name, updates in (("checkpoint_1_7.pt", 7), ("checkpoint_2_14.pt", 14),
                          ("checkpoint1.pt", 5), ("checkpoint2.pt", 9)):
        torch.manual_seed(updates)
        model = task.build_model(cfg.model)
        torch.save({"cfg": OmegaConf.to_container(cfg), "model": model.state_dict(),
                    "optimizer_history": [{"num_updates": updates}]}, models / name)
    return data_bin, models


@pytest.mark.parametrize("which, flag, value, step", [
    ("step", "--ckpt-step", "7", 7), ("epoch", "--ckpt-epoch", "2", 9)])
def test_fairseq_evaluation_names_files_by_the_chosen_step_or_epoch(checkpoints, tmp_path,
                                                                    which, flag, value, step):
    from scalegrad.fairseq_plugin.eval_cli import main

    data_bin, models = checkpoints
    out = tmp_path / "out"
    assert main(["--data-dir", str(data_bin), "--model-path", str(models), "--ckpt", which, flag,
                 value, "--save-path", str(out), "--eval-mode", "singletoken",
                 "--batch-size-single-prediction", "32", "--no-progress", "--device", "cpu"]) == 0
    ckst, ckep = (value, "None") if which == "step" else ("None", value)
    suffix = (f"_models__st_{step}__spl_valid__pfx_50__cmpl_500__bs_cmpl_128__bs_sprd_32__bms_1"
              f"__bnb_0__tpk_1__tpp_0.0__sttpk_1__sttpp_0.0__ckst_{ckst}__ckep_{ckep}__ckpt_{which}")
    assert sorted(p.name for p in out.iterdir()) == sorted([
        f"metrics_{suffix}.json", f"single_token_predictions_{suffix}.txt", f"targets_{suffix}.txt"])
    assert json.loads((out / f"metrics_{suffix}.json").read_text())["checkpoint_step"] == step
