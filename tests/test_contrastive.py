"""The contrastive-token loss and SimCTG's loss (scalegrad.contrastive, docs/objectives.md)
against their published implementations (ct-loss 0.0.3, simctg 0.7) and against dense
position-by-position re-derivations (tests/references.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scalegrad import contrastive_token_loss, simctg_loss
from scalegrad.contrastive import ct_window, simctg_contrastive_loss
from tests.references import dense_contrastive_token_loss, dense_simctg_contrastive_loss

ct_oracle = pytest.importorskip("ct.ct_loss", reason="the ct-loss oracle (pip install ct-loss==0.0.3)")
simctg_oracle = pytest.importorskip("simctg.lossfunction",
                                    reason="the simctg oracle (pip install --no-deps simctg==0.7)")


def quirky_batch(seed=0, batch=3, time=19, vocab=13, dtype=torch.float64):
    """Logits and targets with repeats, the padding id 0 inside a row, -100 at the end
    of a row and in the middle, and a row of one repeated id."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, vocab, generator=generator, dtype=dtype) * 2
    target = torch.randint(0, 5, (batch, time), generator=generator)  # ids 0..4: many repeats
    target[0, -5:] = -100
    target[0, 3] = -100
    target[1, 2] = target[1, 7] = 0
    target[2, :6] = 3
    return logits, target


CT_ARGUMENTS = [  # (ct_length, preced_m_negatives): fractions, counts, mixed, beyond the row
    (0.25, 0.5), (1.0, 1.0), (1, 0.3), (0.6, 0.2), (8, 3), (7.5, 2.5), (12, 0.5), (0.9, 4),
    (50, 40), (3, 1),
]


@pytest.mark.parametrize("ct_length, preced_m_negatives", CT_ARGUMENTS)
@pytest.mark.parametrize("pad_id", [0, 4])
def test_ct_equals_ct_loss_values_and_gradients(ct_length, preced_m_negatives, pad_id):
    logits, target = quirky_batch()
    logits.requires_grad_(True)
    expected = ct_oracle.contrastive_token_loss(logits, target, pad_id=pad_id, ct_length=ct_length,
                                                preced_m_negatives=preced_m_negatives)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    ours = contrastive_token_loss(logits, target, pad_id=pad_id, ct_length=ct_length,
                                  preced_m_negatives=preced_m_negatives)
    (grad,) = torch.autograd.grad(ours, logits)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-6, atol=1e-12)
    assert expected.item() > 0


def test_ct_equals_ct_loss_in_float32_and_with_ignore_index_equal_to_pad_id():
    logits, target = quirky_batch(seed=1, dtype=torch.float32)
    target = target.masked_fill(target == -100, 1)
    logits.requires_grad_(True)
    expected = ct_oracle.contrastive_token_loss(logits, target, ignore_index=1, pad_id=1,
                                                ct_length=0.7, preced_m_negatives=5)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    ours = contrastive_token_loss(logits, target, ignore_index=1, pad_id=1, ct_length=0.7,
                                  preced_m_negatives=5)
    (grad,) = torch.autograd.grad(ours, logits)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pad_id", [0, None])
def test_ct_equals_the_dense_reference(pad_id):
    logits, target = quirky_batch(seed=2)
    target[1, 0] = 0  # id 0 as the very first target
    for ct_length, preced in [(0.5, 0.5), (19, 19), (1, 1), (10, 3)]:
        positions, negatives = ct_window(19, ct_length, preced)
        expected = dense_contrastive_token_loss(logits, target, positions=positions,
                                                negatives=negatives, pad_id=pad_id)
        ours = contrastive_token_loss(logits, target, pad_id=pad_id, ct_length=ct_length,
                                      preced_m_negatives=preced)
        assert ours.item() == pytest.approx(float(expected), rel=1e-12)


def test_ct_window_rounds_as_ct_loss():
    # Fractions of the row, then of the CT length (Python's round: halves to even).
    assert ct_window(10) == (2, 1)          # round(2.5) = 2, round(0.5 * 2) = 1
    assert ct_window(14) == (4, 2)          # round(3.5) = 4
    assert ct_window(10, 1, 1) == (10, 10)  # 1 is a fraction: the whole row, all before
    assert ct_window(10, 2, 2) == (2, 2)    # > 1: counts
    assert ct_window(10, 2.5, 0.5) == (2, 1)
    # A count beyond the row is cut to it; the window follows the asked length.
    assert ct_window(10, 30, 0.5) == (10, 15)


def test_ct_length_one_rows_and_empty_windows_give_zero_with_zero_gradients():
    logits, target = quirky_batch(seed=3)
    logits.requires_grad_(True)
    # preced_m_negatives rounds to 0 negatives (ct-loss fails there) ...
    with pytest.raises(Exception):
        ct_oracle.contrastive_token_loss(logits, target, ct_length=4, preced_m_negatives=0.1)
    loss = contrastive_token_loss(logits, target, ct_length=4, preced_m_negatives=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0
    # ... a row of one position has no earlier targets; no scored position at all (ct-loss: NaN).
    assert contrastive_token_loss(logits[:, :1], target[:, :1]).item() == 0.0
    ignored = torch.full_like(target, -100)
    assert math.isnan(ct_oracle.contrastive_token_loss(logits, ignored).item())
    assert contrastive_token_loss(logits, ignored).item() == 0.0


@pytest.mark.parametrize("name, kwargs", [
    ("ct_length", {"ct_length": 0}), ("ct_length", {"ct_length": -0.5}),
    ("ct_length", {"ct_length": float("nan")}), ("ct_length", {"ct_length": True}),
    ("preced_m_negatives", {"preced_m_negatives": 0}),
    ("preced_m_negatives", {"preced_m_negatives": -2}),
])
def test_ct_refuses_arguments_not_above_zero(name, kwargs):
    logits, target = quirky_batch()
    with pytest.raises(ValueError, match=f"^{name} must be a number > 0"):
        contrastive_token_loss(logits, target, **kwargs)


class FloatShapes(TorchDispatchMode):
    """The distinct storages of the float tensors of shape ``shape`` that ops create."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.storages = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() \
                    and tuple(tensor.shape) == self.shape:
                self.storages.add(tensor.untyped_storage().data_ptr())
        return out


def test_ct_builds_no_time_by_time_tensor():
    logits, target = quirky_batch(time=40, vocab=50)
    logits.requires_grad_(True)
    with FloatShapes((3, 40, 40)) as seen:
        contrastive_token_loss(logits, target, ct_length=1.0, preced_m_negatives=8).backward()
    assert not seen.storages
    with FloatShapes((3, 40, 40)) as seen:  # the oracle does build them
        ct_oracle.contrastive_token_loss(logits, target, ct_length=1.0, preced_m_negatives=8)
    assert seen.storages


# --------------------------------------------------------------------------- #
# SimCTG
# --------------------------------------------------------------------------- #

def simctg_batch(seed=0, batch=3, time=11, vocab=17, dim=8, pad=0):
    """simctg's data: right-padded inputs (``pad``), labels -100 at the same positions,
    hidden states that are not all nearly orthogonal (a shared direction added)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time, dim, generator=generator, dtype=torch.float64)
    hidden = hidden + 1.5 * torch.randn(dim, generator=generator, dtype=torch.float64)
    logits = torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(1, vocab, (batch, time), generator=generator)
    input_ids[0, -4:] = pad
    input_ids[2, -1:] = pad
    labels = input_ids.masked_fill(input_ids == pad, -100)
    return hidden, logits, input_ids, labels


@pytest.mark.parametrize("margin", [0.5, 0.0, 1.3])
def test_simctg_equals_simctg_values_and_gradients(margin):
    hidden, logits, input_ids, labels = simctg_batch()
    hidden.requires_grad_(True)
    logits.requires_grad_(True)
    mle, cl = simctg_oracle.SimCTGLoss(margin, logits.size(-1), 0)(hidden, logits, input_ids, labels)
    expected = mle + cl
    expected_grads = torch.autograd.grad(expected, (hidden, logits))
    ours = simctg_loss(logits, labels, hidden, margin=margin)
    grads = torch.autograd.grad(ours, (hidden, logits))
    assert cl.item() > 0 or margin == 0.0
    assert ours.item() == pytest.approx(expected.item(), rel=1e-9)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad, rtol=1e-6, atol=1e-12)
    # The contrastive term alone is simctg's cl_loss.
    alone = simctg_contrastive_loss(hidden, labels != -100, margin=margin)
    assert alone.item() == pytest.approx(cl.item(), rel=1e-9, abs=1e-15)


def test_simctg_term_equals_the_dense_reference_whatever_the_padding():
    hidden, _, input_ids, labels = simctg_batch(seed=1, time=9)
    valid = labels != -100
    # Left and inner padding: the positions are masked, wherever they are.
    valid[1, :2] = False
    valid[2, 4] = False
    for margin in (0.5, 1.0):
        expected = dense_simctg_contrastive_loss(hidden, valid, margin)
        assert simctg_contrastive_loss(hidden, valid, margin=margin).item() == \
            pytest.approx(float(expected), rel=1e-12)
    # No padding at all: valid=None.
    assert simctg_contrastive_loss(hidden, None).item() == pytest.approx(
        float(dense_simctg_contrastive_loss(hidden, torch.ones(hidden.shape[:2]), 0.5)), rel=1e-12)


def test_simctg_with_left_padding_equals_the_right_padded_rows():
    hidden, logits, _, labels = simctg_batch(seed=2)
    shift = 3
    left_hidden = torch.roll(hidden, shifts=shift, dims=1)
    left_labels = torch.roll(labels, shifts=shift, dims=1)
    # Row 0 ends in 4 padding positions; rolled by 3 they move to the front.
    assert bool((left_labels[0, :3] == -100).all())
    right = simctg_contrastive_loss(hidden, labels != -100)
    left = simctg_contrastive_loss(left_hidden, left_labels != -100)
    assert left.item() == pytest.approx(right.item(), rel=1e-12)


def test_simctg_builds_one_time_by_time_matrix():
    hidden, logits, _, labels = simctg_batch(time=23, dim=16)
    hidden.requires_grad_(True)
    with FloatShapes((3, 23, 23)) as seen:
        simctg_loss(logits, labels, hidden).backward()
    assert len(seen.storages) == 1
    with FloatShapes((3, 23, 23)) as seen:
        _, cl = simctg_oracle.SimCTGLoss(0.5, logits.size(-1), 0)(
            hidden, logits, labels.clamp(min=0), labels)
        cl.backward()
    assert len(seen.storages) > 3


def test_simctg_refuses_a_negative_margin_and_mismatched_shapes():
    hidden, logits, _, labels = simctg_batch()
    with pytest.raises(ValueError, match="^margin must be a number >= 0"):
        simctg_loss(logits, labels, hidden, margin=-0.1)
    with pytest.raises(ValueError, match="hidden_states of shape"):
        simctg_loss(logits, labels, hidden[:, :-1])
    with pytest.raises(ValueError, match="expected logits"):
        simctg_loss(logits[0], labels, hidden)


def test_simctg_float32_hidden_states_and_no_pair():
    hidden, logits, _, labels = simctg_batch()
    loss = simctg_loss(logits.float(), labels, hidden.float())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(simctg_loss(logits, labels, hidden).item(), rel=1e-5)
    one = torch.zeros(3, 11, dtype=torch.bool)
    one[:, 0] = True  # one real token per row: no pair (simctg: NaN)
    assert simctg_contrastive_loss(hidden, one).item() == 0.0
    nll = F.cross_entropy(logits.reshape(-1, 17), labels.reshape(-1))
    assert simctg_loss(logits, labels, hidden, valid=one).item() == pytest.approx(nll.item())
