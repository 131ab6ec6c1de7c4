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
