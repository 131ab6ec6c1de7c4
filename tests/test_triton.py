"""The Triton kernels of the ScaleGrad loss, run on the CPU by Triton's interpreter.

``TRITON_INTERPRET=1`` is set only while :mod:`scalegrad.triton_scalegrad` is
imported (Triton decides at decoration time whether a kernel is interpreted), so
the rest of the test session does not see it. Every value is compared with the
torch path (the reference), and once more with the literal dense definition.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from scalegrad import losses
from scalegrad.losses import first_occurrence_mask, novelty_masks, scalegrad_loss
from tests.references import dense_scalegrad_loss

pytest.importorskip("triton")


def _import_interpreted():
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module("scalegrad.triton_scalegrad")
        if not module.INTERPRETED:  # imported earlier without the interpreter
            module = importlib.reload(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    assert module.INTERPRETED
    return module


ts = _import_interpreted()


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks smaller than the shapes, so that every loop runs several times."""
    monkeypatch.setattr(ts, "MAX_VOCAB_BLOCK", 16)
    monkeypatch.setattr(ts, "CONTEXT_BLOCK", 4)
    monkeypatch.setattr(ts, "FLAGS_BLOCK", 4)


def _inputs(batch, time, vocab, seed, ids=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, time, vocab, generator=g)
    # Few distinct ids so that tokens repeat, token id 0 included.
    target = torch.randint(0, min(vocab, ids), (batch, time), generator=g)
    target[:, 0] = 0
    return logits.to(dtype).requires_grad_(), target


def _both(logits, target, gamma, weight=None, **kwargs):
    """(losses, gradient) of the Triton path and of the torch path."""
    out = []
    for impl in ("triton", "torch"):
        losses_ = scalegrad_loss(logits, target, gamma, reduction="none", impl=impl, **kwargs)
        (grad,) = torch.autograd.grad(losses_, logits, weight if weight is not None else torch.ones_like(losses_))
        out.append((losses_, grad))
    return out


CASES = {
    # name: (batch, time, vocab, ignore_index, distinct ids, small blocks)
    "repeats, several rows": (3, 8, 11, None, 6, True),
    "T = 1": (2, 1, 7, None, 6, True),
    "T > V": (2, 13, 5, None, 5, True),
    "padding": (3, 9, 13, -100, 6, True),
    "ignore_index is id 0": (2, 10, 9, 0, 4, True),
    "wide rows": (2, 9, 300, None, 300, False),
    "one block": (2, 9, 17, 3, 5, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_float32_equals_torch_path(case, request):
    batch, time, vocab, ignore_index, ids, small = CASES[case]
    if small:
        request.getfixturevalue("small_blocks")
    logits, target = _inputs(batch, time, vocab, seed=len(case), ids=ids)
    if ignore_index is not None:
        target[1, -4:] = ignore_index  # trailing padding
        target[-1, 2] = ignore_index  # padding in the middle
    (ours, g_ours), (ref, g_ref) = _both(logits, target, 0.2, ignore_index=ignore_index)
    assert ours.dtype == torch.float32 and g_ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    if ignore_index is not None:
        ignored = target == ignore_index
        assert (ours[ignored] == 0).all() and (g_ours[ignored] == 0).all()
        assert (g_ours[~ignored] != 0).any(dim=-1).all()


@pytest.mark.parametrize("gamma", [0.2, 1.0, 1.7])
@pytest.mark.parametrize("eps", [1e-8, 0.0, 1e-3])
def test_equals_dense_definition(gamma, eps, small_blocks):
    """A second route: the literal dense definition, in float64."""
    logits, target = _inputs(2, 10, 7, seed=3)
    target[0, 6:] = 5
    ours = scalegrad_loss(logits, target, gamma, eps=eps, ignore_index=5, reduction="none", impl="triton")
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    dense_logits = logits.detach().double().requires_grad_()
    ref = dense_scalegrad_loss(dense_logits, target, gamma, ignore_index=5, eps=eps)
    (g_ref,) = torch.autograd.grad(ref.sum(), dense_logits)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_incoming_gradient_scales_each_position(small_blocks):
    """reduction='none' with an arbitrary incoming gradient, and 'sum' times a
    scalar (the kernel reads it from memory, with zero strides)."""
    logits, target = _inputs(2, 13, 10, seed=4)
    weight = torch.randn(2, 13, generator=torch.Generator().manual_seed(5))
    (ours, g_ours), (ref, g_ref) = _both(logits, target, 0.5, weight=weight)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)
    total = scalegrad_loss(logits, target, 0.5, impl="triton")
    torch.testing.assert_close(total, ref.sum(), rtol=1e-6, atol=0)
    (g_sum,) = torch.autograd.grad(total * 0.25, logits)
    (g_sum_ref,) = torch.autograd.grad(scalegrad_loss(logits, target, 0.5, impl="torch") * 0.25, logits)
    torch.testing.assert_close(g_sum, g_sum_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_read_natively(dtype, small_blocks):
    logits, target = _inputs(3, 11, 40, seed=6, dtype=dtype)
    (ours, g_ours), (ref, g_ref) = _both(logits, target, 0.2, ignore_index=None)
    # Both compute in float32 from the same half-precision logits.
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The gradients agree up to the rounding into the half-precision dtype.
    torch.testing.assert_close(g_ours.float(), g_ref.float(), rtol=1e-2, atol=1e-4)


def test_strided_logits_and_target():
    """logits[:, :-1] and batch[:, 1:] as a language model's step makes them."""
    full, batch = _inputs(2, 9, 12, seed=7)
    logits, target = full[:, :-1], batch[:, 1:]
    assert not logits.is_contiguous() and not target.is_contiguous()
    (ours, g_ours), (ref, g_ref) = _both(logits, target, 0.2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_int32_target():
    logits, target = _inputs(2, 7, 9, seed=15)
    (ours, g_ours), (ref, g_ref) = _both(logits, target.int(), 0.2, ignore_index=3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_second_backward_gives_the_same_gradient():
    logits, target = _inputs(1, 6, 8, seed=8)
    total = scalegrad_loss(logits, target, 0.2, impl="triton")
    (first,) = torch.autograd.grad(total, logits, retain_graph=True)
    (second,) = torch.autograd.grad(total, logits)
    assert torch.equal(first, second)


def test_logits_are_left_intact():
    logits, target = _inputs(2, 5, 9, seed=9)
    before = logits.detach().clone()
    scalegrad_loss(logits, target, 0.2, impl="triton").backward()
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("ignore_index", [None, 2])
def test_context_flags_equal_novelty_masks(ignore_index, small_blocks):
    target = torch.randint(0, 4, (3, 23), generator=torch.Generator().manual_seed(10))
    flags = ts.context_flags(target, ignore_index)
    valid = target != ignore_index if ignore_index is not None else None
    _, target_seen = novelty_masks(target, valid)
    assert torch.equal((flags & 1).bool(), first_occurrence_mask(target, valid))
    assert torch.equal((flags & 2).bool(), target_seen)


def test_out_of_range_id_gives_nan():
    logits, target = _inputs(1, 4, 6, seed=11)
    target[0, 2] = 6
    losses_ = scalegrad_loss(logits, target, 0.2, reduction="none", impl="triton")
    assert torch.isnan(losses_[0, 2]) and torch.isfinite(losses_[0, [0, 1, 3]]).all()


def test_bad_impl_is_refused():
    logits, target = _inputs(1, 3, 5, seed=12)
    with pytest.raises(ValueError, match="impl must be 'auto', 'torch' or 'triton'"):
        scalegrad_loss(logits, target, 0.2, impl="cuda")


def test_auto_uses_torch_on_cpu_and_never_needs_triton(monkeypatch):
    logits, target = _inputs(1, 3, 5, seed=13)
    assert not losses.use_triton("auto", logits)
    # Without Triton: 'auto' still works (CPU or not), 'triton' names the fix.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "scalegrad.triton_scalegrad")
    losses.triton_available.cache_clear()
    try:
        assert not losses.triton_available()
        scalegrad_loss(logits, target, 0.2, impl="auto")
        with pytest.raises(ImportError, match=r'pip install "scalegrad\[triton\]"'):
            scalegrad_loss(logits, target, 0.2, impl="triton")
    finally:
        losses.triton_available.cache_clear()


def test_cpu_tensors_outside_the_interpreter_are_refused():
    code = (
        "import torch\n"
        "from scalegrad.losses import scalegrad_loss\n"
        "try:\n"
        "    scalegrad_loss(torch.randn(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), 0.2, impl='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SCALEGRAD_SKIP_FAIRSEQ"] = "1"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "impl='triton' runs on CUDA tensors" in out.stdout
    assert "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.slow
def test_gpu_benchmark_harness_runs_in_the_interpreter(tmp_path):
    """benchmarks/triton_bench.py, on tiny CPU shapes in Triton's interpreter, so that
    a lent GPU's time is not spent on a broken harness (the figures mean nothing here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", SCALEGRAD_SKIP_FAIRSEQ="1")
    out = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "triton_bench.py"), "--device", "cpu",
         "--out-dir", str(tmp_path), "--name", "smoke"],
        capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert results["check"] and all(row["ok"] for row in results["check"])
    assert set(results["loss"][0]["seconds"]) == {"cross_entropy", "scalegrad_torch", "scalegrad_triton"}
    assert "fused_scalegrad" in results["train_step"][0]["seconds"]
    assert "| 1x6x37 | fp32 |" in (tmp_path / "smoke.md").read_text()


@pytest.mark.parametrize("ignore_index", [None, 4])
def test_fused_linear_path_uses_the_kernels_per_chunk(ignore_index, small_blocks):
    """fused_linear_scalegrad_loss(impl='triton'): loss, gradients and statistics
    equal to its torch path, with chunks that do not divide the positions."""
    from scalegrad.fused import fused_linear_scalegrad_loss

    g = torch.Generator().manual_seed(14)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(23, 8, generator=g, requires_grad=True)
    bias = torch.randn(23, generator=g, requires_grad=True)
    target = torch.randint(0, 6, (2, 9), generator=g)
    if ignore_index is not None:
        target[1, -3:] = ignore_index
        target[0, 2] = ignore_index
    results = {}
    for impl in ("triton", "torch"):
        loss, stats = fused_linear_scalegrad_loss(hidden, weight, target, 0.5, bias=bias, ignore_index=ignore_index,
                                                  chunk_size=5, statistics=True, impl=impl)
        grads = torch.autograd.grad(loss * 0.5, (hidden, weight, bias))
        results[impl] = (loss, stats, grads)
    (loss, stats, grads), (ref_loss, ref_stats, ref_grads) = results["triton"], results["torch"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    keep = (target != ignore_index).reshape(-1) if ignore_index is not None else slice(None)
    torch.testing.assert_close(stats["nll"][keep], ref_stats["nll"][keep], rtol=1e-5, atol=1e-6)
    assert torch.equal(stats["higher"], ref_stats["higher"])
    assert torch.equal(stats["predictions"], ref_stats["predictions"])
