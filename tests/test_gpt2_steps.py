"""The GPT-2 driver's training step (``scalegrad.gpt2.objectives`` and the trainer):

- the sequence-level step (generate without gradients, score in one forward) gives the
  continuations, loss and gradients of the original's decoding with gradients (dropout off);
- every step is one forward call of the module the trainer wraps in DDP;
- every writer of a result or checkpoint file keeps the previous file whole when it
  fails part-way.

The two-process torchrun runs (same weights as one process accumulating two chunks for
every kind of step, no parameter averaged outside DDP, SIGTERM preemption) are in
``tests/test_gpt2_distributed.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalegrad.data import load_chunks, make_prefixes
from scalegrad.generation import is_greedy, top_k_top_p_filtering
from scalegrad.gpt2 import checkpoint
from scalegrad.gpt2.evaluate import write_completion_result, write_singletoken_result
from scalegrad.gpt2.objectives import StepModel, sequence_loss
from scalegrad.gpt2.runtime import Runtime
from scalegrad.hf import accepts, cache_argument, returned_cache
from scalegrad.unlikelihood import ngram_repeat_mask, sequence_penalty_loss
from tests import helpers

CPU = Runtime(device=torch.device("cpu"), progress=False)


# --------------------------------------------------------------------------- #
# The sequence-level step
# --------------------------------------------------------------------------- #

def continue_with_graph(model, prefixes, length, top_k, top_p):
    """The original's form (the driver's until now): incremental decoding with a cache,
    keeping the graph through every step: ``(continuations, logits (B, C, V))``."""
    keyword = cache_argument(model)
    extra = {"logits_to_keep": 1} if accepts(model, "logits_to_keep") else {}
    next_input, cache, tokens, step_logits = prefixes, None, [], []
    for _ in range(length):
        output = model(input_ids=next_input, use_cache=True, **{keyword: cache}, **extra)
        logits = output.logits[:, -1, :].float()
        cache = returned_cache(output)
        with torch.no_grad():
            if is_greedy(top_k, top_p):
                next_input = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = F.softmax(top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p), dim=-1)
                next_input = torch.multinomial(probs, num_samples=1)
        tokens.append(next_input)
        step_logits.append(logits)
    return torch.cat(tokens, dim=1), torch.stack(step_logits, dim=1)


def sequence_args(**overrides):
    values = dict(prefix_length=7, continuation_length=9, top_k=1, top_p=0.0, sequence_ngram_n=2,
                  gamma=0.5, fused_chunk_size=8)
    values.update(overrides)
    return Namespace(**values)


@pytest.mark.parametrize("sampling", [dict(top_k=1, top_p=0.0), dict(top_k=5, top_p=0.9)],
                         ids=["greedy", "top-k-top-p"])
def test_sequence_step_equals_decoding_with_gradients(tiny_tokenizer, tiny_data_base, sampling):
    model = helpers.build_tiny_model(len(tiny_tokenizer))  # evaluation mode: dropout off
    chunk = load_chunks(tiny_data_base, "train", 32)[3]
    args = sequence_args(**sampling)

    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    loss, log = sequence_loss(model, chunk, args, CPU)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    torch.manual_seed(5)  # the same draws for sampling
    model.zero_grad(set_to_none=True)
    prefixes = make_prefixes(chunk.unsqueeze(0), args.prefix_length)
    continuations, logits = continue_with_graph(model, prefixes, args.continuation_length,
                                                args.top_k, args.top_p)
    mask = ngram_repeat_mask(continuations, args.sequence_ngram_n)
    expected = sequence_penalty_loss(F.log_softmax(logits, dim=-1), continuations, mask)
    (expected / continuations.numel()).backward()

    assert prefixes.size(0) == 4  # 33 tokens: four prefixes of 7
    assert log["seq_ntokens"] == continuations.numel() == 4 * 9
    assert log["seq_repeat_mask"] == float(mask.sum()) > 0  # some tokens are penalised
    assert log["seq_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(expected.item() / continuations.numel(), rel=1e-5)
    for name, p in model.named_parameters():
        scale = max(p.grad.abs().max().item(), 1e-6)
        assert (grads[name] - p.grad).abs().max().item() <= 1e-4 * scale, name


def test_every_step_is_one_forward_of_the_wrapped_module(tiny_tokenizer, tiny_data_base):
    """StepModel.forward runs each objective; the model inside is called through it
    (the sequence step: the generation calls and one scoring call, all inside)."""
    model = helpers.build_tiny_model(len(tiny_tokenizer))
    chunk = load_chunks(tiny_data_base, "train", 32)[0]
    step_model = StepModel(model, sequence_args(), CPU)
    assert list(step_model.parameters()) == list(model.parameters())
    inside = []
    outer = step_model.register_forward_pre_hook(lambda *a: inside.append("enter"))
    inner = model.register_forward_pre_hook(lambda *a: inside.append("model"))
    for objective in ("token", "fused", "sequence"):
        inside.clear()
        loss, log = step_model(chunk, objective)
        assert inside[0] == "enter" and inside.count("enter") == 1, objective
        assert loss.requires_grad and loss.dim() == 0
    outer.remove()
    inner.remove()
    with pytest.raises(ValueError, match="unknown objective"):
        step_model(chunk, "other")


# --------------------------------------------------------------------------- #
# Writers keep the previous file whole when they fail part-way
# --------------------------------------------------------------------------- #

class Boom(RuntimeError):
    pass


def tree(path: Path) -> dict:
    """Every file under ``path`` (relative name -> bytes), temporaries included."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def half_then_raise(write):
    """A writer that writes part of its output, then raises."""
    def broken(*args, **kwargs):
        write(*args, **kwargs)
        raise Boom("failed part-way")
    return broken


def result_args():
    return Namespace(model_name="tiny", eval_split="valid", batch_size_singletoken=200, top_k=1,
                     top_p=0.0, prefix_length=8, continuation_length=6)


def test_result_file_writers_keep_the_previous_file(tmp_path, monkeypatch):
    args = result_args()
    report = {"bpe_metrics": {"a": 0.5}, "word_metrics": {"b": 0.25}, "uniq": 3,
              "completions": ["x"]}
    write_singletoken_result(tmp_path, args, {"ppl": 1.0}, {"n": 1})
    write_singletoken_result(tmp_path, args, {"ppl": 2.0}, {"n": 1}, step=4)
    write_completion_result(tmp_path, args, report, {"n": 1})
    before = tree(tmp_path)
    assert len(before) == 3

    def partial_dump(obj, f, **kwargs):
        f.write(json.dumps(obj)[:5])
        f.flush()
        raise Boom("failed part-way")

    monkeypatch.setattr(json, "dump", partial_dump)
    for write in (lambda: write_singletoken_result(tmp_path, args, {"ppl": 9.0}, {"n": 2}),
                  lambda: write_singletoken_result(tmp_path, args, {"ppl": 9.0}, {"n": 2}, step=4),
                  lambda: write_completion_result(tmp_path, args, dict(report, uniq=9), {"n": 2})):
        with pytest.raises(Boom):
            write()
        assert tree(tmp_path) == before  # the old files, whole; no temporary left


@pytest.fixture()
def saved_run(tiny_tokenizer, tmp_path):
    """An output folder with a published checkpoint and a best model; a second model."""
    first = helpers.build_tiny_model(len(tiny_tokenizer), seed=0)
    second = helpers.build_tiny_model(len(tiny_tokenizer), seed=1)
    out = tmp_path / "out"
    checkpoint.save_resume_checkpoint(out, first, tiny_tokenizer, {"format": 1, "step": 1},
                                      publish=True)
    checkpoint.save_best(out, first, tiny_tokenizer, "singletoken__a_1.json", {"ppl": 3.0})
    return out, second, tiny_tokenizer


def test_checkpoint_writers_keep_the_previous_files(saved_run, monkeypatch):
    out, second, tokenizer = saved_run
    before = tree(out)
    assert "model.safetensors" in before and "resume/training_state.pt" in before
    assert "best/singletoken__a_1.json" in before

    # torch.save of the training state writes half, then raises.
    with monkeypatch.context() as m:
        m.setattr(torch, "save", half_then_raise(lambda obj, path: Path(path).write_bytes(b"half")))
        with pytest.raises(Boom):
            checkpoint.save_resume_checkpoint(out, second, tokenizer, {"step": 2}, publish=True)
    assert tree(out) == before

    # The best model's result file: json.dump writes a few bytes, then raises.
    with monkeypatch.context() as m:
        m.setattr(json, "dump", half_then_raise(lambda obj, f, **k: f.write("{\"ppl")))
        with pytest.raises(Boom):
            checkpoint.save_best(out, second, tokenizer, "singletoken__a_2.json", {"ppl": 2.0})
    assert tree(out) == before

    # Publishing into the top folder: neither a link nor a copy can be made (the copy
    # writes half of the file first).
    def failing_link(source, destination, **kwargs):
        raise OSError("no links here")

    def partial_copy(source, destination, **kwargs):
        Path(destination).write_bytes(Path(source).read_bytes()[:100])
        raise Boom("copy failed part-way")

    with monkeypatch.context() as m:
        m.setattr(os, "link", failing_link)
        m.setattr(shutil, "copy2", partial_copy)
        with pytest.raises(Boom):
            checkpoint.save_resume_checkpoint(out, second, tokenizer, {"step": 2}, publish=True)
    after = tree(out)
    # The new resume/ folder is whole (written and renamed before publishing) ...
    assert torch.load(out / "resume" / "training_state.pt", weights_only=True) == {"step": 2}
    # ... and every published file in the top folder is still the old one, whole.
    for name, content in before.items():
        if "/" not in name:
            assert after[name] == content, name
    assert sorted(n for n in after if "/" not in n) == sorted(n for n in before if "/" not in n)
