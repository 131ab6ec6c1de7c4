"""The GPT-2 driver under torchrun, two gloo processes on the CPU (slow):

- for the plain, the fused (``--fused-loss``) and the sequence-level
  (``--sequence-tune-rate 1``) step, two processes end with the same weights as one
  process accumulating two chunks per update, and no tensor larger than a flag is
  all-reduced by Python code: DDP's bucketed all-reduce does all the averaging;
- preemption as a cluster scheduler does it: SIGTERM to every rank (or to rank 0
  alone) of a running job stops all ranks after the same step with one checkpoint,
  every rank exits 0, and ``--resume`` under torchrun ends bit-equal to an
  uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalegrad.data import load_split, save_split, split_path
from scalegrad.gpt2 import checkpoint
from scalegrad.gpt2.driver import run
from scalegrad.gpt2.options import parse_args

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_gpt2.py"
WORKER = Path(__file__).resolve().parent / "gpt2_recording_worker.py"


@pytest.fixture(scope="module")
def data_base(tiny_data_base, tmp_path_factory):
    """Training chunks of 32 + 1 tokens (18 with 600 tokens); short valid split."""
    path = tmp_path_factory.mktemp("ddp_data")
    for split, size in {"train": 1700, "valid": 700, "test": 700}.items():
        save_split(load_split(split_path(tiny_data_base, split))[:size], split_path(path, split))
    return str(path)


def train_argv(data_base, output_dir, model_dir, *extra):
    return [str(a) for a in (
        "--mode", "train", "--data-base", data_base, "--output-dir", output_dir,
        "--model-load-dir", model_dir, "--model-name", "tiny", "--no-progress",
        "--eval-split", "valid", "--batch-size-singletoken", 200, "--train-batch-size", 32,
        "--learning-rate", 1e-3, "--report-metrics-every", 1, *extra)]


def torchrun_command(script, argv):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(script), *argv]


def weights(directory):
    return load_file(str(Path(directory) / "model.safetensors"))


STEP_KINDS = {
    "plain": [],
    "fused": ["--fused-loss", "--fused-chunk-size", 8],
    "sequence": ["--sequence-tune-rate", 1, "--prefix-length", 8, "--continuation-length", 6],
}


@pytest.mark.parametrize("kind", list(STEP_KINDS))
def test_two_processes_equal_one_accumulating_two(tiny_model_dir, data_base, tmp_path, kind):
    flags = ["--train-n-steps", 3, "--exact-train-n-steps", "--gamma", 0.5, "--validate-every",
             1000, "--save-every", 1000, *STEP_KINDS[kind]]
    env = dict(os.environ, OMP_NUM_THREADS="1", RECORD_DIR=str(tmp_path))
    proc = subprocess.run(
        torchrun_command(WORKER, train_argv(data_base, tmp_path / "ddp", tiny_model_dir, *flags)),
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "step 3:" in output and ("seq_loss" if kind == "sequence" else "hits_at_1") in output

    # Rank r takes chunks r, r + 2, ... of the epoch's order: one process accumulating
    # two chunks per update sees the same pairs and averages the same gradients.
    run(parse_args(train_argv(data_base, tmp_path / "single", tiny_model_dir, *flags,
                              "--gradient-accumulation-steps", 2)))
    ddp, single = weights(tmp_path / "ddp"), weights(tmp_path / "single")
    start = weights(tiny_model_dir)
    assert max((single[k] - start[k]).abs().max().item() for k in single) > 1e-4  # it trained
    for key in single:
        assert torch.allclose(ddp[key], single[key], rtol=1e-4, atol=1e-6), key

    # Python code all-reduced nothing but one-element flags (the non-finite and stop
    # checks): every gradient was averaged by DDP, none by hand.
    for rank in (0, 1):
        sizes = json.loads((tmp_path / f"all_reduce_rank{rank}.json").read_text())
        assert sizes and set(sizes) == {1}, (rank, sorted(set(sizes))[-3:])


# --------------------------------------------------------------------------- #
# Preemption: SIGTERM to the ranks of a running job
# --------------------------------------------------------------------------- #

SIGNAL_FLAGS = ["--train-n-steps", 1000, "--validate-every", 12, "--save-every", 2, "--gamma", 0.8]


def start(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(torchrun_command(SCRIPT, argv), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)


def finish(proc, timeout=300):
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_uninterrupted")
    output = finish(start(train_argv(data_base, root / "out", tiny_model_dir, *SIGNAL_FLAGS), root))
    state = checkpoint.load_training_state(root / "out")
    assert state["progress"]["finished"] and state["world_size"] == 2
    assert "step 20:" in output
    return root / "out", state["progress"]["total_steps"]


def worker_pids(agent_pid):
    """``{rank: pid}`` of the worker processes torchrun started."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = dict(item.split("=", 1) for item in
                       (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = int(entry.name)
    return ranks


def wait_for(proc, needle, timeout=240):
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return lines
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError("never saw %r:\n%s" % (needle, "".join(lines[-30:])))


@pytest.mark.parametrize("targets", [(0, 1), (0,)], ids=["every-rank", "rank-0-alone"])
def test_sigterm_stops_every_rank_at_the_same_step_and_resume_is_bit_equal(
        tiny_model_dir, data_base, uninterrupted, tmp_path, targets):
    reference, total = uninterrupted
    out = tmp_path / "out"
    argv = train_argv(data_base, out, tiny_model_dir, *SIGNAL_FLAGS)
    proc = start(argv, tmp_path)
    seen = wait_for(proc, "step 4:")
    pids = worker_pids(proc.pid)
    assert sorted(pids) == [0, 1], pids
    for rank in targets:
        os.kill(pids[rank], signal.SIGTERM)
    output = "".join(seen) + finish(proc)  # torchrun exits 0: every rank exited 0

    stops = dict(re.findall(r"rank (\d) stopped \((?:SIGTERM|another rank's stop request)\) "
                            r"after (\d+) steps", output))
    assert sorted(stops) == ["0", "1"] and len(set(stops.values())) == 1, output[-3000:]
    stopped_at = int(stops["0"])
    state = checkpoint.load_training_state(out)
    assert state["progress"]["total_steps"] == stopped_at and 4 <= stopped_at < total
    assert not state["progress"]["finished"] and state["world_size"] == 2
    assert "run the same command with --resume" in output

    finish(start(argv + ["--resume"], tmp_path))
    resumed, expected = weights(out), weights(reference)
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)
    final = checkpoint.load_training_state(out)
    assert final["progress"]["finished"] and final["progress"]["total_steps"] == total
