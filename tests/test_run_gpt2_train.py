"""scripts/run_gpt2.py --mode train: the original's loop and files, resume, interruption,
non-finite losses, the optimiser, and two-process torchrun.

Runs use the tiny model of conftest.py on chunks of 32 + 1 tokens; the end-to-end
subprocess runs are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegrad.data import load_split, save_split, split_path
from scalegrad.errors import UserError
from scalegrad.gpt2 import checkpoint
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.optim import OriginalAdamW, parameter_groups
from scalegrad.gpt2.options import parse_args
from scalegrad.gpt2.trainer import Plan, make_plan, training_report

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_gpt2.py"


def make_data_base(source, path, sizes):
    for split, size in sizes.items():
        save_split(load_split(split_path(source, split))[:size], split_path(path, split))
    return str(path)


@pytest.fixture(scope="module")
def short_data_base(tiny_data_base, tmp_path_factory):
    """18 training chunks of 32 + 1 tokens (epochs end quickly); 6 validation chunks of 200 + 1."""
    return make_data_base(tiny_data_base, tmp_path_factory.mktemp("short_data"),
                          {"train": 600, "valid": 1300, "test": 1300})


@pytest.fixture(scope="module")
def long_data_base(tiny_data_base, tmp_path_factory):
    """181 training chunks of 32 + 1 tokens."""
    return make_data_base(tiny_data_base, tmp_path_factory.mktemp("long_data"),
                          {"train": 6000, "valid": 1300, "test": 1300})


def train_argv(data_base, output_dir, model_dir, *extra):
    return ["--mode", "train", "--data-base", str(data_base), "--output-dir", str(output_dir),
            "--model-load-dir", str(model_dir), "--model-name", "tiny", "--no-progress",
            "--eval-split", "valid", "--batch-size-singletoken", "200",
            "--train-batch-size", "32", "--learning-rate", "1e-3", *map(str, extra)]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def json_files(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))
            if p.name.startswith(("singletoken__", "completion__"))}


# --------------------------------------------------------------------------- #
# The loop and its files
# --------------------------------------------------------------------------- #

def test_train_writes_the_original_files_and_steps(tiny_model_dir, long_data_base, tmp_path):
    out = tmp_path / "out"
    modes = []
    result = run(parse_args(train_argv(long_data_base, out, tiny_model_dir, "--gamma", "0.5",
                                       "--train-n-steps", 5, "--validate-every", 2,
                                       "--save-every", 4, "--report-metrics-every", 2)),
                 on_step=lambda trainer: modes.append(trainer.model.training))
    # Step indices 0..5: six updates; the last one neither validates nor saves (quirk).
    assert result.train.status == "finished" and result.train.total_steps == 6
    assert modes == [False] * 6  # the model stays in evaluation mode (quirk)
    assert sorted(json_files(out)) == ["singletoken__tiny__spl_valid__bsz_200_2.json",
                                       "singletoken__tiny__spl_valid__bsz_200_4.json"]
    for content in json_files(out).values():
        assert set(content) == {"metrics", "config", "objective"}
        assert content["objective"] == {"name": "scalegrad", "gamma": 0.5, "sequence_tune_rate": 0.0}
        assert {"loss", "ppl", "hits_at_1", "repeat_at_1/128", "uniq", "human_uniq"} <= set(content["metrics"])
    best = out / "best"
    assert (best / "model.safetensors").is_file() and (best / "config.json").is_file()
    assert (best / "tokenizer.json").is_file()
    assert set(json_files(best)) <= set(json_files(out)) and json_files(best)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    state = checkpoint.load_training_state(out)
    assert state["progress"]["finished"] and state["progress"]["total_steps"] == 6
    # The schedule decays to 0 at t_total = chunks x epochs = 181, not at train_n_steps.
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(1e-3 * (181 - 6) / 181)
    report = result.train.last_report
    assert report["ppl"] == pytest.approx(2 ** report["loss"]) and "seq_loss" in report
    assert report["ntokens"] == 2 * 32  # the last two steps' chunks
    assert_same_weights(out, out / "resume")


def test_step_quirks_and_their_options(tiny_model_dir, short_data_base, tmp_path):
    common = ["--validate-every", 1000, "--save-every", 1000, "--train-n-steps", 3]
    # Several epochs: the step limit applies per epoch (4 updates in each of 2 epochs).
    result = run(parse_args(train_argv(short_data_base, tmp_path / "a", tiny_model_dir,
                                       "--num-train-epochs", 2, *common)))
    assert result.train.total_steps == 8
    # --exact-train-n-steps: exactly 3 updates in all.
    result = run(parse_args(train_argv(short_data_base, tmp_path / "b", tiny_model_dir,
                                       "--num-train-epochs", 2, "--exact-train-n-steps", *common)))
    assert result.train.total_steps == 3
    # An epoch ends early when the split has fewer chunks (18 here) than train_n_steps + 1.
    result = run(parse_args(train_argv(short_data_base, tmp_path / "c", tiny_model_dir,
                                       "--validate-every", 1000, "--save-every", 1000)))
    assert result.train.total_steps == 18


def test_plan_schedule_length():
    args = parse_args(["--output-dir", "x", "--data-base", ".", "--mode", "train"])
    plan = make_plan(args, 1000, 1)
    assert (plan.updates_per_epoch, plan.num_epochs, plan.total_schedule_steps) == (1000, 1, 1000)
    args.max_steps = 2500  # t_total = max_steps, epochs = 2500 // 1000 + 1
    assert make_plan(args, 1000, 1) == Plan(1000, 1000, 1, 1000, 3, 2500)
    args.max_steps, args.gradient_accumulation_steps = -1, 4
    assert make_plan(args, 1000, 2) == Plan(1000, 500, 4, 125, 1, 125)
    with pytest.raises(UserError, match="too few"):
        make_plan(args, 7, 2)


# --------------------------------------------------------------------------- #
# Resume
# --------------------------------------------------------------------------- #

RESUME_FLAGS = ["--gamma", 0.5, "--gradient-accumulation-steps", 2, "--num-train-epochs", 2,
                "--train-n-steps", 100, "--validate-every", 4, "--save-every", 3,
                "--report-metrics-every", 2, "--sequence-tune-rate", 0.5, "--prefix-length", 8,
                "--continuation-length", 5, "--enable-dropout", "--max-grad-norm", 1.0,
                "--warmup-steps", 2]


def test_resume_is_bit_equal_to_an_uninterrupted_run(tiny_model_dir, short_data_base, tmp_path):
    reference = run(parse_args(train_argv(short_data_base, tmp_path / "ref", tiny_model_dir,
                                          *RESUME_FLAGS)))
    assert reference.train.total_steps == 18  # 9 updates of 2 chunks in each of 2 epochs

    out = tmp_path / "resumed"
    argv = train_argv(short_data_base, out, tiny_model_dir, *RESUME_FLAGS)

    def stop_at(trainer):  # what SIGINT/SIGTERM do: stop after this step with a checkpoint
        if trainer.progress.total_steps in (4, 13):
            trainer.stop.request()

    first = run(parse_args(argv), on_step=stop_at)
    assert first.train.status == "interrupted" and first.train.total_steps == 4
    assert "--resume" in first.resume_hint
    second = run(parse_args(argv + ["--resume"]), on_step=stop_at)
    assert second.train.status == "interrupted" and second.train.total_steps == 13
    third = run(parse_args(argv + ["--resume"]))
    assert third.train.status == "finished" and third.train.total_steps == 18

    assert_same_weights(tmp_path / "ref", out)
    assert_same_weights(tmp_path / "ref" / "best", out / "best")
    assert json_files(tmp_path / "ref") == json_files(out)
    assert json_files(tmp_path / "ref" / "best") == json_files(out / "best")
    assert third.train.last_report == reference.train.last_report
    ref_state = checkpoint.load_training_state(tmp_path / "ref")
    state = checkpoint.load_training_state(out)
    for a, b in zip(ref_state["optimizer"]["state"].values(), state["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    again = run(parse_args(argv + ["--resume"]))
    assert again.train.status == "already-finished"
    assert_same_weights(tmp_path / "ref", out)


def test_resume_refuses_a_changed_split(tiny_model_dir, short_data_base, long_data_base, tmp_path):
    out = tmp_path / "out"
    run(parse_args(train_argv(short_data_base, out, tiny_model_dir, "--train-n-steps", 1,
                              "--validate-every", 1000)),
        on_step=lambda trainer: trainer.stop.request())
    with pytest.raises(UserError, match="chunks"):
        run(parse_args(train_argv(long_data_base, out, tiny_model_dir, "--train-n-steps", 1,
                                  "--validate-every", 1000, "--resume")))


# --------------------------------------------------------------------------- #
# Non-finite losses
# --------------------------------------------------------------------------- #

def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_model_dir, short_data_base, tmp_path,
                                                       monkeypatch, caplog):
    from scalegrad.gpt2 import objectives

    real_loss = objectives.scalegrad_loss
    calls = {"n": 0}
    bad_calls = {2, 3}

    def flaky_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(objectives, "scalegrad_loss", flaky_loss)
    result = run(parse_args(train_argv(short_data_base, tmp_path / "a", tiny_model_dir,
                                       "--train-n-steps", 5, "--validate-every", 1000,
                                       "--report-metrics-every", 6)))
    assert result.train.status == "finished" and result.train.total_steps == 6
    assert result.train.last_report["nonfinite_skipped"] == 2
    assert result.train.last_report["ntokens"] == 4 * 32
    assert "non-finite loss, step skipped" in caplog.text
    for tensor in weights(tmp_path / "a").values():
        assert torch.isfinite(tensor).all()

    # Always non-finite: the run stops after --max-nonfinite-steps with the weights untouched.
    bad_calls = set(range(1000))
    calls["n"] = 0
    out = tmp_path / "b"
    with pytest.raises(UserError, match="3 steps in a row had a non-finite loss"):
        run(parse_args(train_argv(short_data_base, out, tiny_model_dir, "--train-n-steps", 10,
                                  "--validate-every", 1000, "--max-nonfinite-steps", 3)))
    assert_same_weights(tiny_model_dir, out / "resume")
    assert checkpoint.load_training_state(out)["progress"]["total_steps"] == 3


# --------------------------------------------------------------------------- #
# The optimiser
# --------------------------------------------------------------------------- #

def test_original_adamw_step_by_hand():
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    start = p.detach().clone()
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(3)]
    lr, eps, wd, b1, b2 = 0.1, 1e-3, 0.01, 0.9, 0.999
    optimizer = OriginalAdamW([{"params": [p], "weight_decay": wd}], lr=lr, eps=eps)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
    x, m, v = start.clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (v.sqrt() + eps)
        x = x - lr * wd * x  # decay after the update
    assert torch.allclose(p.detach(), x, rtol=0, atol=1e-12)


def test_only_biases_escape_weight_decay(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    decayed, exempt = parameter_groups(model.named_parameters(), 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0
    assert exempt["params"] and all(names[id(p)].endswith("bias") for p in exempt["params"])
    assert any(".ln_1.weight" in names[id(p)] for p in decayed["params"])  # GPT-2's ln_* (quirk)


def test_training_report_adds_sequence_metrics():
    logs = [{"loss": 10.0, "ntokens": 5, "sample_size": 5, "normalizer": 5, "hits_at_1": 2.0},
            {"seq_loss": 3.0, "seq_ntokens": 10, "seq_sample_size": 10, "seq_nsentences": 2,
             "seq_repeat_mask": 4.0, "pct_repeat_4grams": 0.5}]
    report = training_report(logs)
    assert report["loss"] == pytest.approx(10 / 5 / math.log(2))
    assert report["ppl"] == pytest.approx(2 ** report["loss"])
    assert report["seq_loss"] == pytest.approx(3 / 10 / math.log(2))
    assert report["seq_repeat_mask"] == pytest.approx(0.4)
    assert report["seq_pct_repeat_4grams"] == pytest.approx(0.25)


# --------------------------------------------------------------------------- #
# Real signals and kill -9, in a subprocess (slow)
# --------------------------------------------------------------------------- #

SIGNAL_FLAGS = ["--train-n-steps", 1000, "--validate-every", 40, "--save-every", 2,
                "--report-metrics-every", 1, "--gamma", 0.8]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, long_data_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    result = run(parse_args(train_argv(long_data_base, out, tiny_model_dir, *SIGNAL_FLAGS)))
    assert result.train.total_steps == 181
    return out


def start_training(argv, cwd):
    # The same number of threads as this process: float sums (and so the weights)
    # depend on it, and the resumed part of the run happens in here.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)


def wait_for(proc, needle, count=1, timeout=120):
    seen, lines, deadline = 0, [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            seen += 1
            if seen >= count:
                return lines
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError("never saw %r:\n%s" % (needle, "".join(lines[-30:])))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_and_resume_finishes_the_same(
        tiny_model_dir, long_data_base, uninterrupted, tmp_path, sig):
    out = tmp_path / "out"
    argv = train_argv(long_data_base, out, tiny_model_dir, *SIGNAL_FLAGS)
    proc = start_training(argv, tmp_path)
    wait_for(proc, "step 5:")
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "run the same command with --resume" in rest
    state = checkpoint.load_training_state(out)
    assert 5 <= state["progress"]["total_steps"] < 181 and not state["progress"]["finished"]
    result = run(parse_args(argv + ["--resume"]))
    assert result.train.status == "finished"
    assert_same_weights(uninterrupted, out)
    assert json_files(uninterrupted) == json_files(out)


@pytest.mark.slow
def test_kill_9_leaves_every_file_whole(tiny_model_dir, long_data_base, uninterrupted, tmp_path):
    out = tmp_path / "out"
    argv = train_argv(long_data_base, out, tiny_model_dir, *SIGNAL_FLAGS)
    proc = start_training(argv, tmp_path)
    wait_for(proc, "checkpoint written", count=4)
    time.sleep(random.Random(0).uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    state = checkpoint.load_training_state(out)  # whole and loadable
    assert state is not None and not state["progress"]["finished"]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / checkpoint.RESUME_DIR)
    AutoModelForCausalLM.from_pretrained(out)
    json_files(out)  # every result file parses
    run(parse_args(argv + ["--resume"]))
    assert_same_weights(uninterrupted, out)
    assert json_files(uninterrupted) == json_files(out)


# --------------------------------------------------------------------------- #
# torchrun with two CPU processes (slow)
# --------------------------------------------------------------------------- #

def torchrun(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(SCRIPT), *argv]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_accumulating_two(
        tiny_model_dir, short_data_base, tmp_path):
    flags = ["--train-n-steps", 100, "--validate-every", 4, "--save-every", 5,
             "--report-metrics-every", 3, "--gamma", 0.5]
    ddp_out = tmp_path / "ddp"
    torchrun(train_argv(short_data_base, ddp_out, tiny_model_dir, *flags), tmp_path)
    single_out = tmp_path / "single"
    # Rank r takes chunks r, r + 2, ... of the epoch's order: one process accumulating two
    # chunks per update sees the same pairs and averages the same gradients.
    single = run(parse_args(train_argv(short_data_base, single_out, tiny_model_dir, *flags,
                                       "--gradient-accumulation-steps", 2)))
    assert single.train.total_steps == 9
    ddp_state = checkpoint.load_training_state(ddp_out)
    assert ddp_state["world_size"] == 2 and ddp_state["progress"]["total_steps"] == 9
    assert len(ddp_state["rng"]) == 2
    wa, wb = weights(ddp_out), weights(single_out)
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-6), key
    ddp_results, single_results = json_files(ddp_out), json_files(single_out)
    assert sorted(ddp_results) == sorted(single_results) == [
        "singletoken__tiny__spl_valid__bsz_200_4.json", "singletoken__tiny__spl_valid__bsz_200_8.json"]
    for name in ddp_results:
        for key, value in single_results[name]["metrics"].items():
            assert ddp_results[name]["metrics"][key] == pytest.approx(value, rel=1e-4), key


@pytest.mark.slow
def test_torchrun_evaluation_equals_one_process(tiny_model_dir, short_data_base, tmp_path):
    flags = ["--mode", "eval-both", "--eval-split", "valid", "--data-base", short_data_base,
             "--model-load-dir", tiny_model_dir, "--model-name", "tiny", "--no-progress",
             "--batch-size-singletoken", 200, "--batch-size-completion", 60, "--prefix-length", 10,
             "--continuation-length", 6, "--completion-batch-size", 16]
    flags = [str(f) for f in flags]
    torchrun(flags + ["--output-dir", str(tmp_path / "ddp")], tmp_path)
    run(parse_args(flags + ["--output-dir", str(tmp_path / "single")]))
    ddp, single = json_files(tmp_path / "ddp"), json_files(tmp_path / "single")
    assert sorted(ddp) == sorted(single) and len(ddp) == 2
    for name in ddp:
        if name.startswith("completion__"):
            assert ddp[name] == single[name]
        else:
            for key, value in single[name]["metrics"].items():
                assert ddp[name]["metrics"][key] == pytest.approx(value, rel=1e-9), key
