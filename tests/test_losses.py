import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalegrad.losses import first_occurrence_mask, scalegrad_loss
from tests.references import dense_scalegrad_loss

GOLDEN = json.loads((Path(__file__).parent / "data" / "original_outputs.json").read_text())


@pytest.mark.parametrize("case", range(len(GOLDEN["scalegrad"])))
def test_matches_original_outputs(case):
    """Loss sums and gradients returned by the original code (float32)."""
    entry = GOLDEN["scalegrad"][case]
    sequence = torch.tensor(entry["sequence"])
    logits = torch.tensor(entry["logits"], requires_grad=True)
    loss = scalegrad_loss(logits[None], sequence[1:][None], entry["gamma"])
    loss.backward()
    assert loss.item() == pytest.approx(entry["loss_sum"], rel=1e-5)
    torch.testing.assert_close(logits.grad, torch.tensor(entry["grad_of_loss_sum"]), rtol=1e-5, atol=1e-6)


def _inputs(batch, time, vocab, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, time, vocab, generator=g, dtype=dtype)).requires_grad_()
    # Few distinct ids so that tokens repeat, token id 0 included.
    target = torch.randint(0, min(vocab, 6), (batch, time), generator=g)
    target[:, 0] = 0
    return logits, target


@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8, 1.0, 1.7])
@pytest.mark.parametrize("ignore_index", [None, 3])
def test_equals_dense_definition_values_and_gradients(gamma, ignore_index):
    logits, target = _inputs(batch=3, time=17, vocab=11, seed=int(gamma * 10))
    if ignore_index is not None:
        target[1, -5:] = ignore_index  # trailing padding
        target[2, 4] = ignore_index  # padding in the middle
    ours = scalegrad_loss(logits, target, gamma, ignore_index=ignore_index, reduction="none")
    ref = dense_scalegrad_loss(logits, target, gamma, ignore_index=ignore_index)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-10)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-10)
    if ignore_index is not None:
        assert (ours[target == ignore_index] == 0).all()


def test_float32_equals_dense_within_1e5():
    logits, target = _inputs(batch=2, time=40, vocab=50, seed=1, dtype=torch.float32)
    ours = scalegrad_loss(logits, target, 0.2, reduction="none")
    ref = dense_scalegrad_loss(logits.double(), target, 0.2)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_rows_are_independent_sequences():
    logits, target = _inputs(batch=2, time=9, vocab=7, seed=3)
    together = scalegrad_loss(logits, target, 0.3, reduction="none")
    for b in range(2):
        alone = scalegrad_loss(logits[b:b + 1], target[b:b + 1], 0.3, reduction="none")
        torch.testing.assert_close(together[b:b + 1], alone)


def test_gamma_one_is_cross_entropy():
    # Unit-scale logits: no target probability is so small that the 1e-8
    # smoothing shows (it does for p ~ 1e-6, as it did in the original).
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 30, 40, generator=g)
    target = torch.randint(0, 6, (2, 30), generator=g)
    ours = scalegrad_loss(logits, target, 1.0)
    ce = F.cross_entropy(logits.reshape(-1, 40), target.reshape(-1), reduction="sum")
    assert ours.item() == pytest.approx(ce.item(), rel=1e-4)


def test_hand_computed_vocabulary_of_four():
    # p = softmax(log [0.1, 0.2, 0.3, 0.4]) = the probabilities themselves.
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    logits = probs.log()[None]
    target = torch.tensor([[2, 2]])
    gamma, eps = 0.5, 1e-8
    losses = scalegrad_loss(logits, target, gamma, eps=eps, reduction="none")[0]
    # t=0: nothing seen, every token novel: q = (0.5 p + eps) / (0.5 + 4 eps).
    assert losses[0].item() == pytest.approx(-math.log((0.15 + eps) / (0.5 + 4 * eps)), rel=1e-12)
    # t=1: token 2 seen: numerator 0.3 + eps, Z = 0.5 * 0.7 + 0.3 + 4 eps = 0.65 + 4 eps.
    assert losses[1].item() == pytest.approx(-math.log((0.3 + eps) / (0.65 + 4 * eps)), rel=1e-12)


def test_low_precision_logits_are_computed_in_float32():
    logits, target = _inputs(batch=1, time=12, vocab=20, seed=4, dtype=torch.float32)
    low = logits.detach().to(torch.bfloat16)
    ours = scalegrad_loss(low, target, 0.2)
    assert ours.dtype == torch.float32
    ref = scalegrad_loss(low.float(), target, 0.2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, -0.5, float("nan")])
def test_gamma_must_be_positive(gamma):
    logits, target = _inputs(1, 3, 5, 0)
    with pytest.raises(ValueError, match="gamma must be a number > 0"):
        scalegrad_loss(logits, target, gamma)


def test_gamma_above_one_warns_once_per_value():
    import warnings

    from scalegrad import GammaAboveOneWarning
    from scalegrad.losses import _warn_gamma_above_one

    _warn_gamma_above_one.cache_clear()
    logits, target = _inputs(1, 3, 5, 0)
    with pytest.warns(GammaAboveOneWarning, match="> 1 penalises novel tokens") as record:
        scalegrad_loss(logits, target, 2.0)
        scalegrad_loss(logits, target, 2.0)
        scalegrad_loss(logits, target, 3.0)
    assert [str(w.message).split(" ")[0] for w in record] == ["gamma=2", "gamma=3"]
    assert issubclass(GammaAboveOneWarning, UserWarning)
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scalegrad_loss(logits, target, 0.5)  # no warning at all for gamma <= 1
        scalegrad_loss(logits, target, 1.0)


def test_length_one_and_empty():
    logits = torch.randn(1, 1, 5, dtype=torch.float64)
    target = torch.tensor([[4]])
    torch.testing.assert_close(
        scalegrad_loss(logits, target, 0.2, reduction="none"),
        dense_scalegrad_loss(logits, target, 0.2),
    )
    assert scalegrad_loss(torch.randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long), 0.2).item() == 0


def test_first_occurrence_mask():
    target = torch.tensor([[5, 0, 5, 0, 7, 7], [1, 1, 1, 2, 9, 1]])
    valid = torch.tensor([[True] * 6, [False, True, True, True, False, True]])
    assert first_occurrence_mask(target).tolist() == [
        [True, True, False, False, True, False],
        [True, False, False, True, True, False],
    ]
    assert first_occurrence_mask(target, valid)[1].tolist() == [False, True, False, True, False, False]


def test_keeps_one_dense_tensor_and_frees_it_in_backward():
    """Between forward and backward the loss keeps the logits (saved, not
    copied) and one dense log-softmax (cross-entropy keeps one too); the
    backward pass turns that one into the gradient and drops it."""
    batch, time, vocab = 2, 16, 5000
    logits = torch.randn(batch, time, vocab, requires_grad=True)
    target = torch.randint(0, vocab, (batch, time))
    saved_dense = []

    def pack(t):
        if t.numel() >= batch * time * vocab:
            saved_dense.append(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = scalegrad_loss(logits, target, 0.2, reduction="none")
    assert saved_dense == [logits.data_ptr()]
    node = losses.grad_fn
    assert node.lprobs.shape == (batch, time, vocab)
    losses.sum().backward()
    assert node.lprobs is None


def test_backward_twice_with_retain_graph():
    logits, target = _inputs(batch=2, time=7, vocab=9, seed=5)
    loss = scalegrad_loss(logits, target, 0.2)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g1, g2)


def test_second_order_terms_not_needed_for_first_order_use():
    # Logits that are themselves a function of parameters: the chain rule works.
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 7), generator=g)
    (ours,) = torch.autograd.grad(scalegrad_loss(hidden @ weight.t(), target, 0.5), weight)
    (ref,) = torch.autograd.grad(dense_scalegrad_loss(hidden @ weight.t(), target, 0.5).sum(), weight)
    torch.testing.assert_close(ours, ref)
