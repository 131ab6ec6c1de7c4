import pytest
import torch

from scalegrad.fused import fused_linear_scalegrad_loss
from scalegrad.losses import scalegrad_loss


def _case(seed, batch=2, time=13, dim=8, vocab=17, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time, dim, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True) if bias else None
    target = torch.randint(0, 5, (batch, time), generator=g)
    target[:, 0] = 0
    return hidden, weight, b, target


@pytest.mark.parametrize("gamma", [0.2, 0.8, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("ignore_index", [None, 4])
def test_equals_plain_loss_values_and_gradients(gamma, chunk_size, ignore_index):
    hidden, weight, bias, target = _case(int(gamma * 10) + chunk_size)
    if ignore_index is not None:
        target[0, -3:] = ignore_index
    fused = fused_linear_scalegrad_loss(hidden, weight, target, gamma, bias=bias,
                                        ignore_index=ignore_index, chunk_size=chunk_size)
    grads_fused = torch.autograd.grad(3.0 * fused, (hidden, weight, bias))
    logits = hidden @ weight.t() + bias
    plain = scalegrad_loss(logits, target, gamma, ignore_index=ignore_index)
    grads_plain = torch.autograd.grad(3.0 * plain, (hidden, weight, bias))
    torch.testing.assert_close(fused.double(), plain.double(), rtol=1e-6, atol=1e-8)
    for a, b in zip(grads_fused, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_float32_without_bias_and_frozen_weight():
    hidden, weight, _, target = _case(7, dtype=torch.float32, bias=False)
    weight.requires_grad_(False)
    fused = fused_linear_scalegrad_loss(hidden, weight, target, 0.2, chunk_size=4)
    (g_fused,) = torch.autograd.grad(fused, hidden)
    plain = scalegrad_loss(hidden @ weight.t(), target, 0.2)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-4, atol=1e-6)


def test_no_gradient_work_under_no_grad(monkeypatch):
    """Under torch.no_grad() (validation) the loss is the same and the chunked
    gradient products are never computed."""
    from scalegrad import fused

    hidden, weight, bias, target = _case(9)
    expected = fused_linear_scalegrad_loss(hidden, weight, target, 0.2, bias=bias).detach()
    calls = []
    monkeypatch.setattr(fused, "scalegrad_logit_grad_", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        value = fused_linear_scalegrad_loss(hidden, weight, target, 0.2, bias=bias)
    assert calls == [] and value.grad_fn is None
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ignore_index", [None, 4])
def test_statistics_from_the_same_pass_equal_the_full_logits(dtype, ignore_index):
    """statistics=True: the loss and gradients are unchanged, and nll / higher /
    predictions equal token_statistics of the full logits (a second route)."""
    from scalegrad.metrics import token_statistics

    hidden, weight, bias, target = _case(11, time=29, vocab=23, dtype=dtype)
    if ignore_index is not None:
        target[1, -5:] = ignore_index
    loss, stats = fused_linear_scalegrad_loss(hidden, weight, target, 0.5, bias=bias,
                                              ignore_index=ignore_index, chunk_size=6,
                                              statistics=True)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    plain = fused_linear_scalegrad_loss(hidden, weight, target, 0.5, bias=bias,
                                        ignore_index=ignore_index, chunk_size=6)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    for a, b in zip(grads, torch.autograd.grad(plain, (hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    logits = torch.nn.functional.linear(hidden, weight, bias).detach().reshape(-1, 23)
    flat = target.reshape(-1)
    keep = flat != ignore_index if ignore_index is not None else torch.ones_like(flat, dtype=torch.bool)
    expected = token_statistics(logits[keep], flat[keep])
    assert stats["higher"].shape == stats["predictions"].shape == (flat.numel(),)
    assert torch.equal(stats["higher"][keep], expected["higher"])
    assert torch.equal(stats["predictions"][keep], expected["predictions"])
    torch.testing.assert_close(stats["nll"][keep], expected["nll"].to(stats["nll"].dtype),
                               rtol=1e-5, atol=1e-5)
    # by hand, for one position: the logits above the target's, and the NLL
    row = int(keep.nonzero()[3])
    assert int(stats["higher"][row]) == int((logits[row] > logits[row, flat[row]]).sum())
    assert float(stats["nll"][row]) == pytest.approx(
        float(-torch.log_softmax(logits[row].double(), 0)[flat[row]]), rel=1e-5)


def test_statistics_make_each_chunk_logits_once():
    """One head matmul per chunk in all (the statistics add none): every matrix product
    with a (positions, vocab) result is counted; none of the statistics needs a gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab = 17
    hidden, weight, bias, target = _case(12, time=20, vocab=vocab)

    class CountLogitProducts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.matmul, torch.ops.aten.linear):
                if out.dim() == 2 and out.shape[1] == vocab:
                    CountLogitProducts.count += 1
            return out

    for bias_or_none in (bias, None):
        CountLogitProducts.count = 0
        with CountLogitProducts():
            loss, stats = fused_linear_scalegrad_loss(hidden, weight, target, 0.2, bias=bias_or_none,
                                                      chunk_size=7, statistics=True)
            loss.backward()
        assert CountLogitProducts.count == 6  # 40 positions in chunks of 7
        assert not any(value.requires_grad for value in stats.values())
