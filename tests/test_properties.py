"""Property tests (hypothesis) of the loss and the metrics."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scalegrad.losses import scalegrad_loss
from scalegrad.metrics import ngram_metrics

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def sequences(draw, max_vocab=12, max_time=10):
    vocab = draw(st.integers(2, max_vocab))
    time = draw(st.integers(1, max_time))
    target = draw(st.lists(st.integers(0, vocab - 1), min_size=time, max_size=time))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    logits = scale * torch.randn(1, time, vocab, generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64)
    return logits, torch.tensor([target])


gammas = st.floats(0.01, 1.0)


@SETTINGS
@given(sequences(), gammas, st.randoms(use_true_random=False))
def test_relabelling_vocabulary_leaves_loss_unchanged(data, gamma, rnd):
    logits, target = data
    vocab = logits.shape[-1]
    perm = list(range(vocab))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    relabelled = torch.empty_like(logits)
    relabelled[..., perm] = logits  # id v becomes perm[v]
    a = scalegrad_loss(logits, target, gamma)
    b = scalegrad_loss(relabelled, perm[target], gamma)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(sequences(), gammas, st.floats(-1e4, 1e4))
def test_loss_is_finite_for_finite_logits(data, gamma, shift):
    logits, target = data
    logits = (logits * 100 + shift).float().requires_grad_()
    loss = scalegrad_loss(logits, target, gamma)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@SETTINGS
@given(sequences(), st.floats(0.05, 0.95))
def test_gradient_on_target_logit_against_cross_entropy(data, gamma):
    """The paper's analysis (without the 1e-8 smoothing): with gamma < 1 the
    gradient on a novel target's logit is at least as large in magnitude as
    under MLE, strictly once earlier tokens carry probability; on a repeated
    target's logit it is at most as large."""
    logits, target = data
    logits = logits.clone().requires_grad_()
    (g_sg,) = torch.autograd.grad(scalegrad_loss(logits, target, gamma, eps=0.0), logits)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits[0], target[0], reduction="sum"), logits)
    probs = logits.detach().softmax(-1)[0]
    ys = target[0].tolist()
    for t, y in enumerate(ys):
        sg, ce = abs(g_sg[0, t, y].item()), abs(g_ce[0, t, y].item())
        seen = set(ys[:t])
        if y not in seen:
            assert sg >= ce - 1e-12
            seen_mass = sum(probs[t, v].item() for v in seen)
            if seen_mass > 1e-6 and probs[t, y].item() > 1e-6:
                assert sg > ce
        else:
            assert sg <= ce + 1e-12


@SETTINGS
@given(st.lists(st.integers(0, 6), max_size=40), st.integers(-1, 6))
def test_pct_repeat_in_unit_interval(tokens, pad):
    for value in ngram_metrics(tokens, pad=pad).values():
        assert 0.0 <= value <= 1.0


@SETTINGS
@given(st.lists(st.integers(0, 10**6), max_size=40, unique=True))
def test_pct_repeat_zero_without_repeats(tokens):
    assert set(ngram_metrics(tokens, pad=-1).values()) <= {0.0}
