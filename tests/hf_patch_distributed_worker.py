"""One rank of the apply_scalegrad runs under torchrun (gloo, CPU); see test_hf_patch_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 hf_patch_distributed_worker.py MODE MODEL_DIR OUT

MODE ``ddp`` or ``fsdp``: each rank trains the patched model on its half of the fixed batch
(``batch_halves``) for ``STEPS`` SGD steps, the loss divided by the tokens of the whole
batch (``num_items_in_batch``) and multiplied by the world size (DDP and FSDP average the
gradients, as Trainer does); rank 0 writes the final weights and each step's summed loss.
MODE ``trainer``: ``transformers.Trainer`` on the patched model, rank 0 writes its log.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scalegrad import apply_scalegrad  # noqa: E402

STEPS = 3
LR = 0.5
GAMMA = 0.3


def batch_halves():
    """A (4, 10) batch with repeats, id 0 and -100 padding, as two halves of two rows."""
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 50, (4, 10), generator=generator)
    input_ids[0, :3] = 0
    input_ids[3, 2:8] = torch.tensor([4, 6, 4, 6, 4, 0])
    labels = input_ids.clone()
    labels[1, 7:] = -100
    labels[2, 5:] = -100
    num_items = int((labels[:, 1:] != -100).sum())
    return [(input_ids[:2], labels[:2]), (input_ids[2:], labels[2:])], num_items


def train_halves(model, halves, num_items, world_size, optimizer):
    """STEPS steps; returns each step's loss summed over the halves given."""
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for input_ids, labels in halves:
            loss = model(input_ids=input_ids, labels=labels, num_items_in_batch=num_items).loss
            (loss * world_size).backward()
            total += loss.detach()
        losses.append(total)
        optimizer.step()
    return losses


def main(mode, model_dir, out):
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    apply_scalegrad(model, GAMMA, chunk_size=4)
    if mode == "trainer":
        return run_trainer(model, rank, out)
    halves, num_items = batch_halves()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        params = wrapped.parameters()
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped, params = model, model.parameters()
    optimizer = torch.optim.SGD(params, lr=LR)
    losses = train_halves(wrapped, [halves[rank]], num_items, world_size, optimizer)
    losses = torch.stack(losses)
    dist.all_reduce(losses)
    state = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name] = full.detach().clone()
    if rank == 0:
        torch.save({"weights": state, "losses": losses}, out)
    dist.barrier()
    dist.destroy_process_group()


def run_trainer(model, rank, out):
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(7)
    base = torch.randint(3, 40, (12,), generator=generator)
    rows = [{"input_ids": base.roll(shift).tolist(), "labels": base.roll(shift).tolist()} for shift in range(8)]
    args = TrainingArguments(output_dir=os.path.dirname(out), max_steps=10, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True, ddp_backend="gloo")
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": trainer.args.world_size, "log": trainer.state.log_history}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
