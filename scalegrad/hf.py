"""Hugging Face model helpers shared by the GPT-2 driver, the generation code and
the fairseq ``gpt2_pretrained`` model: one home for each.

* :func:`unwrap`: the model inside DistributedDataParallel / fairseq proxy wrappers;
* :func:`accepts`, :func:`cache_argument`, :func:`returned_cache`: the key/value
  cache keyword and output field (``past_key_values`` before transformers 5.2x,
  ``cache`` after), whichever the model takes; :func:`reorder_cache`: a cache's
  rows picked (repeated, reordered) by index;
* :func:`linear_head`, :func:`check_linear_head`: whether the logits are the last
  hidden state times the output embedding (what the fused loss needs);
* :func:`hf_config_from_dict`: a config object back from its ``to_dict()`` form.

Pure torch and transformers; nothing here imports a driver or fairseq.
"""

from __future__ import annotations

import inspect

import torch

__all__ = [
    "unwrap", "accepts", "cache_argument", "returned_cache", "reorder_cache", "linear_head",
    "check_linear_head", "hf_config_from_dict",
]


def unwrap(model):
    """The model inside any chain of wrappers that hold it as ``.module``
    (DistributedDataParallel, fairseq's ModuleProxyWrapper), or the model itself."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def accepts(model, argument: str) -> bool:
    """Does the (unwrapped) model's ``forward`` take the keyword ``argument``?"""
    try:
        return argument in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(model) -> str:
    """The keyword that hands the key/value cache to the model: ``cache`` (transformers
    5.2x and later) or ``past_key_values``."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def returned_cache(output):
    """The key/value cache a model returned with ``use_cache=True``."""
    keys = output.keys()
    for key in ("cache", "past_key_values"):
        if key in keys:
            return output[key]
    raise RuntimeError("the model returned no key/value cache although use_cache=True was passed")


def reorder_cache(cache, rows: torch.Tensor):
    """The key/value cache with its batch rows replaced by ``rows`` (row indices,
    repeats allowed: ``arange(B).repeat_interleave(K)`` makes K copies of each row).

    A transformers ``Cache`` object (``DynamicCache``) is reordered in place
    (its ``reorder_cache``) and returned; the legacy form, a tuple per layer of
    ``(key, value)`` tensors with the batch first, gives a new tuple.
    """
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(rows)
        return cache
    if isinstance(cache, (tuple, list)):
        return tuple(tuple(t.index_select(0, rows.to(t.device)) for t in layer) for layer in cache)
    raise TypeError(f"cannot reorder a key/value cache of type {type(cache).__name__}")


def linear_head(model):
    """``(base_model, head)`` of a Hugging Face causal LM: the model without its LM
    head (``model.base_model``, i.e. ``getattr(model, model.base_model_prefix)``;
    ``model.transformer`` for GPT-2) and its output embedding, an ``nn.Linear``.

    Raises ``ValueError`` (saying why) when the model has no such parts. Whether
    the logits really are ``head(base_model(...).last_hidden_state)`` is
    :func:`check_linear_head`'s business.
    """
    model = unwrap(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"its output embedding is {type(head).__name__}, not a linear layer")
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if not isinstance(base, torch.nn.Module) or base is model:
        raise ValueError("it has no base model (the model without its LM head) to take the "
                         "hidden states from")
    return base, head


@torch.no_grad()
def check_linear_head(model, input_ids: torch.Tensor):
    """Check on ``input_ids`` (``(1, n)``, a few tokens) that the model's logits are
    ``base_model(...).last_hidden_state @ head.weight.T (+ head.bias)``: no scaling,
    soft-capping or other step after the head, and the head's input is the base
    model's last hidden state. Returns :func:`linear_head`'s ``(base, head)``;
    raises ``ValueError`` saying what differs.

    The head's output is replaced, through a forward hook, by random values
    spread over [-50, 50] (from a generator of its own: the global random state
    is untouched); the model's logits must be exactly those values. Runs in
    evaluation mode (no dropout), then restores the mode.
    """
    base, head = linear_head(model)
    model = unwrap(model)
    captured: dict[str, torch.Tensor] = {}

    def probe(module, inputs, output):
        generator = torch.Generator().manual_seed(0)
        values = torch.rand(output.shape, generator=generator, dtype=torch.float32) * 100 - 50
        captured["input"] = inputs[0].detach()
        captured["output"] = values.to(device=output.device, dtype=output.dtype)
        return captured["output"]

    was_training = model.training
    model.eval()
    handle = head.register_forward_hook(probe)
    try:
        try:
            logits = model(input_ids=input_ids).logits
        finally:
            handle.remove()
        hidden = base(input_ids=input_ids).last_hidden_state
    except (AttributeError, TypeError) as exc:
        raise ValueError(f"its forward pass does not give logits and last hidden states as "
                         f"Hugging Face causal LMs do ({exc})") from None
    finally:
        model.train(was_training)
    if "output" not in captured:
        raise ValueError("its forward pass does not call its output embedding")
    if logits.shape != captured["output"].shape or not torch.equal(
            logits.float(), captured["output"].float()):
        raise ValueError("its logits are not the output embedding's output (the forward pass "
                         "transforms them: scaling or soft-capping, say)")
    if hidden.shape != captured["input"].shape or not torch.allclose(
            hidden.float(), captured["input"].float(), rtol=1e-5, atol=1e-6):
        raise ValueError("the output embedding's input is not the base model's last hidden "
                         "state")
    return base, head


def hf_config_from_dict(config_dict: dict):
    """A Hugging Face config object from its ``to_dict()`` form."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if model_type in CONFIG_MAPPING:
        return CONFIG_MAPPING[model_type].from_dict(config_dict)
    return PretrainedConfig.from_dict(config_dict)
