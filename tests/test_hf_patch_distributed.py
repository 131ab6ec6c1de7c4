"""apply_scalegrad under torchrun with two gloo processes on the CPU (slow):

- DDP: two processes, each on half of the batch, end with the same weights as one process
  accumulating the two halves (the loss over num_items_in_batch of the whole batch);
- FSDP2 (``fully_shard`` on each decoder layer and the model): the same, from the sharded
  model's gathered weights, with the same losses;
- a ``transformers.Trainer`` launched by torchrun with two processes trains the patched model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import hf_patch_distributed_worker as worker

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "hf_patch_distributed_worker.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def torchrun(mode, model_dir, out, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
         mode, model_dir, str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def one_process_accumulating(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    worker.apply_scalegrad(model, worker.GAMMA, chunk_size=4)
    halves, num_items = worker.batch_halves()
    optimizer = torch.optim.SGD(model.parameters(), lr=worker.LR)
    losses = worker.train_halves(model, halves, num_items, 1, optimizer)
    return dict(model.named_parameters()), torch.stack(losses)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_accumulating_both_halves(mode, model_dir, tmp_path):
    out = tmp_path / f"{mode}.pt"
    torchrun(mode, model_dir, out, tmp_path)
    result = torch.load(out, weights_only=True)
    weights, losses = one_process_accumulating(model_dir)
    torch.testing.assert_close(result["losses"], losses, rtol=1e-5, atol=0)
    assert losses[-1] < losses[0]
    assert set(result["weights"]) == set(weights)
    from safetensors.torch import load_file

    initial = load_file(str(Path(model_dir) / "model.safetensors"))
    assert all(not torch.equal(initial[name], value) for name, value in weights.items() if name in initial)
    for name, value in weights.items():
        torch.testing.assert_close(result["weights"][name], value.detach(), rtol=1e-5, atol=1e-6)


def test_trainer_under_torchrun_trains_the_patched_model(model_dir, tmp_path):
    out = tmp_path / "trainer.json"
    torchrun("trainer", model_dir, out, tmp_path)
    result = json.loads(out.read_text())
    losses = [row["loss"] for row in result["log"] if "loss" in row]
    assert result["world_size"] == 2 and len(losses) == 10
    assert losses[-1] < 0.8 * losses[0], losses
