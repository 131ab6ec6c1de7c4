"""apply_scalegrad: the fused ScaleGrad loss inside Hugging Face causal LMs' own forward.

Each family is built tiny from its config, saved and loaded back; the patched model's
loss and every parameter's gradient must equal ScaleGradLoss on the unpatched model's
full logits (fp32, 1e-5 relative), on quirky batches (padding with -100, repeated
tokens, token id 0, a length-2 row) with and without num_items_in_batch.
"""

from __future__ import annotations

import pytest
import torch

from scalegrad import ScaleGradLoss, apply_scalegrad, remove_scalegrad, scalegrad_patched
from scalegrad.hf_patch import fused_patch_settings

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": SMALL,
    "mistral": SMALL,
    "qwen2": SMALL,
    "qwen3": dict(SMALL, head_dim=8),
    "gpt2": dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                 eos_token_id=2),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "opt": dict(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=1, bos_token_id=2,
                eos_token_id=2),
    "phi3": SMALL,
    "phi": dict(SMALL, num_key_value_heads=2),  # a head with a bias: handled exactly
}


def tiny_causal_lm(model_type: str, tmp_path, seed: int = 0, **overrides):
    """A seeded random tiny causal LM of ``model_type``, saved and loaded back, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**FAMILIES.get(model_type, SMALL), **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    path = tmp_path / model_type
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def quirky_batch():
    """Two rows of 12: repeats, token id 0, -100 padding of the second row's tail."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    input_ids[0, :4] = torch.tensor([0, 0, 7, 0])
    input_ids[1, 2:8] = torch.tensor([5, 9, 5, 9, 5, 0])
    labels = input_ids.clone()
    labels[1, 9:] = -100
    labels[0, 0] = -100
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    return input_ids, attention_mask, labels


def gradients(model):
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_relative(actual, expected, rtol=1e-5, floor=0.0):
    """Within ``rtol`` of ``expected``'s largest entry (at least ``floor``: a parameter whose
    gradient is zero up to rounding, OPT's ``k_proj.bias``, is compared on the model's scale)."""
    scale = expected.abs().max().clamp(min=max(floor, 1e-12))
    assert (actual - expected).abs().max() <= rtol * scale, ((actual - expected).abs().max(), scale)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patched_loss_and_gradients_equal_scalegradloss(model_type, tmp_path):
    model = tiny_causal_lm(model_type, tmp_path)
    input_ids, attention_mask, labels = quirky_batch()
    with torch.no_grad():
        plain_logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        plain_ce = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        greedy = model.generate(input_ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)

    for num_items in (None, torch.tensor(23)):
        expected = ScaleGradLoss(0.2)(model(input_ids=input_ids, attention_mask=attention_mask), labels,
                                      num_items_in_batch=num_items)
        expected.backward()
        expected_grads = gradients(model)

        apply_scalegrad(model, 0.2, chunk_size=5)
        output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                       num_items_in_batch=num_items)
        assert output.logits is None
        assert_relative(output.loss.detach(), expected.detach())
        output.loss.backward()
        grads = gradients(model)
        assert set(grads) == set(expected_grads) and len(grads) == len(list(model.parameters()))
        floor = 1e-3 * max(grad.abs().max().item() for grad in expected_grads.values())
        for name, grad in grads.items():
            assert_relative(grad, expected_grads[name], floor=floor)

        # Without labels: the model as before (logits included), generate unchanged.
        with torch.no_grad():
            assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, plain_logits)
            assert torch.equal(model.generate(input_ids[:1, :5], max_new_tokens=6, do_sample=False,
                                              pad_token_id=0), greedy)
        remove_scalegrad(model)
        assert "forward" not in model.__dict__ and fused_patch_settings(model) is None
        with torch.no_grad():
            restored = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        assert torch.equal(restored.logits, plain_logits) and torch.equal(restored.loss, plain_ce)

    # gamma = 1 is the model's own cross-entropy.
    with scalegrad_patched(model, 1.0), torch.no_grad():
        ce = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    assert_relative(ce, plain_ce)
    assert "forward" not in model.__dict__


def test_length_one_rows_and_return_dict_false(tmp_path):
    model = tiny_causal_lm("llama", tmp_path)
    input_ids = torch.tensor([[0], [3]])
    apply_scalegrad(model, 0.5)
    # Nothing to score: a finite zero, as ScaleGradLoss's clamp.
    assert model(input_ids=input_ids, labels=input_ids).loss.item() == 0.0
    input_ids = torch.tensor([[0, 0, 4, 0]])
    as_tuple = model(input_ids=input_ids, labels=input_ids, return_dict=False)
    remove_scalegrad(model)
    expected = ScaleGradLoss(0.5)(model(input_ids=input_ids), input_ids)
    assert isinstance(as_tuple, tuple)
    assert_relative(as_tuple[0].detach(), expected.detach())


def test_peft_model_patched_through_its_base_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    input_ids, attention_mask, labels = quirky_batch()
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    results = []
    for order in ("before", "after"):
        model = tiny_causal_lm("qwen2", tmp_path)
        torch.manual_seed(1)  # the same random LoRA weights in both orders
        if order == "before":
            apply_scalegrad(model, 0.2)
            model = get_peft_model(model, LoraConfig(**lora))
        else:
            model = get_peft_model(model, LoraConfig(**lora))
            apply_scalegrad(model, 0.2)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        grads = gradients(model)
        remove_scalegrad(model)
        expected = ScaleGradLoss(0.2)(model(input_ids=input_ids, attention_mask=attention_mask), labels)
        expected.backward()
        expected_grads = gradients(model)
        assert_relative(loss.detach(), expected.detach())
        assert grads and set(grads) == set(expected_grads)
        assert all("lora" in name for name in grads)
        for name in grads:
            assert_relative(grads[name], expected_grads[name])
        results.append(loss.item())
    assert results[0] == pytest.approx(results[1], rel=1e-6)

    model = get_peft_model(tiny_causal_lm("llama", tmp_path),
                           LoraConfig(**dict(lora, target_modules=["q_proj", "lm_head"])))
    with pytest.raises(ValueError, match="apply_scalegrad: .*leave lm_head out of target_modules"):
        apply_scalegrad(model, 0.2)
    assert "forward" not in model.get_base_model().__dict__


@pytest.mark.parametrize("model_type, overrides, reason", [
    ("gemma2", dict(head_dim=8), "soft-caps its logits"),
    ("cohere", {}, "scales its logits"),
    ("granite", dict(logits_scaling=2.0), "logits_scaling"),
])
def test_transformed_logits_are_refused(model_type, overrides, reason, tmp_path):
    model = tiny_causal_lm(model_type, tmp_path, **overrides)
    with pytest.raises(ValueError, match=f"^apply_scalegrad: {type(model).__name__} .*{reason}"):
        apply_scalegrad(model, 0.2)
    assert "forward" not in model.__dict__ and fused_patch_settings(model) is None


def test_bad_input_is_refused_with_one_line_and_nothing_changed(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    model = tiny_causal_lm("llama", tmp_path)
    for gamma in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^apply_scalegrad: gamma must be a number > 0") as info:
            apply_scalegrad(model, gamma)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="chunk_size"):
        apply_scalegrad(model, 0.2, chunk_size=0)
    assert "forward" not in model.__dict__

    bart = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(
        "bart", vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64))
    with pytest.raises(ValueError, match="encoder-decoder"):
        apply_scalegrad(bart, 0.2)
    headless = AutoModel.from_config(model.config)
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_scalegrad(headless, 0.2)

    apply_scalegrad(model, 0.2)
    assert apply_scalegrad(model, 0.2) is model  # the same settings again: nothing to do
    with pytest.raises(ValueError, match="already patched .*remove_scalegrad"):
        apply_scalegrad(model, 0.5)
    assert fused_patch_settings(model)[:2] == ("scalegrad", 0.2)
    input_ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.raises(ValueError, match=r"labels of shape \(1, 3\) do not match input_ids of shape \(1, 4\)"):
        model(input_ids=input_ids, labels=input_ids[:, :3])
    remove_scalegrad(model)
    with pytest.raises(ValueError, match="is not patched"):
        remove_scalegrad(model)


def test_replaced_forward_or_head_is_caught(tmp_path):
    model = tiny_causal_lm("llama", tmp_path).train()
    input_ids = torch.tensor([[3, 4, 5, 6, 3]])
    apply_scalegrad(model, 0.2)
    patched = model.forward
    model.forward = lambda **kwargs: type(model).forward(model, **kwargs)  # as TRL's SFTTrainer does
    with pytest.raises(RuntimeError, match="forward was replaced after apply_scalegrad"):
        model(input_ids=input_ids, labels=input_ids)
    with pytest.raises(ValueError, match="forward was replaced"):
        remove_scalegrad(model)
    model.forward = patched
    model.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(RuntimeError, match="output embedding was replaced"):
        model(input_ids=input_ids, labels=input_ids)
    remove_scalegrad(model)


def test_no_full_logits_in_the_patched_training_step(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    model = tiny_causal_lm("llama", tmp_path).train()
    input_ids, attention_mask, labels = quirky_batch()
    shapes = []

    class OutputShapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor):
                    shapes.append(tuple(tensor.shape))
            return out

    def full_logits(found):
        return sum(1 for shape in found if len(shape) >= 2 and shape[-1] == VOCAB and
                   (len(shape) == 3 or shape[0] >= input_ids.numel()))

    with OutputShapes():  # the counter sees the unpatched model's logits
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert full_logits(shapes) > 0
    shapes.clear()
    apply_scalegrad(model, 0.2, chunk_size=8)
    with OutputShapes():
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
    assert full_logits(shapes) == 0 and (8, VOCAB) in shapes
