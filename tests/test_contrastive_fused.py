"""The contrastive-token objective in the fused chunk loop (docs/objectives.md):
``fused_linear_contrastive_token_loss`` equals ``CE + CT`` on the full logits, and
``apply_contrastive_token`` (inside a Hugging Face model's forward) equals the
``ContrastiveTokenLoss`` hook, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalegrad import ContrastiveTokenLoss, apply_contrastive_token, contrastive_token_loss
from scalegrad import remove_scalegrad
from scalegrad.contrastive import fused_linear_contrastive_token_loss
from scalegrad.hf_patch import fused_patch_settings
from tests.test_contrastive import CT_ARGUMENTS, quirky_batch
from tests.test_hf_patch import VOCAB, assert_relative, gradients, tiny_causal_lm
from tests.test_hf_patch import quirky_batch as quirky_lm_batch


@pytest.mark.parametrize("ct_length, preced_m_negatives", CT_ARGUMENTS + [(4, 0.1)])
@pytest.mark.parametrize("pad_id, chunk_size", [(0, 5), (None, 64), (4, 1)])
def test_fused_equals_cross_entropy_plus_ct_on_the_full_logits(ct_length, preced_m_negatives,
                                                               pad_id, chunk_size):
    generator = torch.Generator().manual_seed(7)
    _, target = quirky_batch()
    hidden = torch.randn(3, 19, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=generator, dtype=torch.float64, requires_grad=True)
    logits = F.linear(hidden, weight, bias)
    scored = (target != -100).sum()
    plain = F.cross_entropy(logits.reshape(-1, 13), target.reshape(-1), reduction="sum") + \
        scored * contrastive_token_loss(logits, target, pad_id=pad_id, ct_length=ct_length,
                                        preced_m_negatives=preced_m_negatives)
    expected = torch.autograd.grad(plain, (hidden, weight, bias))
    fused, stats = fused_linear_contrastive_token_loss(
        hidden, weight, target, bias=bias, pad_id=pad_id, ct_length=ct_length,
        preced_m_negatives=preced_m_negatives, chunk_size=chunk_size, statistics=True)
    grads = torch.autograd.grad(fused, (hidden, weight, bias))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-12)
    for grad, expected_grad in zip(grads, expected):
        assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)
    keep = target.reshape(-1) != -100
    nll = F.cross_entropy(logits.reshape(-1, 13), target.reshape(-1), reduction="none", ignore_index=-100)
    assert torch.allclose(stats["nll"][keep], nll[keep].detach())


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "phi"])
def test_apply_contrastive_token_equals_the_hook_on_the_full_logits(model_type, tmp_path):
    model = tiny_causal_lm(model_type, tmp_path)
    input_ids, attention_mask, labels = quirky_lm_batch()
    # 0.3 of the 11 shifted positions is 3, of the 12 inputs 4: the fused path must count 11.
    hook = ContrastiveTokenLoss(ct_length=0.3, preced_m_negatives=3)
    results = {}
    for num_items in (None, torch.tensor(40)):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        loss = hook(outputs, labels, num_items_in_batch=num_items)
        loss.backward()
        results[num_items is None] = (loss.item(), gradients(model))
    apply_contrastive_token(model, 0.3, 3, chunk_size=5)
    assert fused_patch_settings(model)[0] == "contrastive_token"
    for num_items in (None, torch.tensor(40)):
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                       num_items_in_batch=num_items)
        output.loss.backward()
        expected_loss, expected_grads = results[num_items is None]
        assert output.loss.item() == pytest.approx(expected_loss, rel=1e-5)
        grads = gradients(model)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert_relative(grad, expected_grads[name], floor=1e-6)
    # Without labels the model is itself; the patch comes off.
    assert model(input_ids=input_ids).logits.shape == (2, 12, VOCAB)
    remove_scalegrad(model)
    assert fused_patch_settings(model) is None


def test_apply_contrastive_token_refuses_bad_arguments(tmp_path):
    model = tiny_causal_lm("gpt2", tmp_path)
    with pytest.raises(ValueError, match="ct_length must be a number > 0"):
        apply_contrastive_token(model, ct_length=0)
    with pytest.raises(ValueError, match="preced_m_negatives must be a number > 0"):
        apply_contrastive_token(model, preced_m_negatives=-1)
    assert fused_patch_settings(model) is None
