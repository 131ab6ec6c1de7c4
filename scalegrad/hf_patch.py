"""ScaleGrad inside a Hugging Face causal LM's own forward pass: :func:`apply_scalegrad`.

``apply_scalegrad(model, 0.2)`` patches a causal LM *instance* so that
``model(input_ids=..., labels=...)`` returns the ScaleGrad loss computed from the
last hidden states a chunk of positions at a time (:mod:`scalegrad.fused`): the
``(batch, time, vocab)`` logits are never made, and the trainers that read the
model's own ``loss`` (``transformers.Trainer``, accelerate, DeepSpeed, FSDP) train
with ScaleGrad as they are. See docs/large-vocabularies.md.

How: while a call with labels runs, the model's output embedding (found through
``get_output_embeddings()``) has its ``forward`` swapped for one that computes the
fused loss from its input, the hidden states the model itself hands to its head,
and returns an empty ``(batch, time, 0)`` stand-in for the logits. The loss is
thus computed inside the head's own call, where FSDP and DeepSpeed ZeRO-3 hold
its weight whole, and the model's forward runs unchanged otherwise: one generic
patch for every family whose logits are ``head(last hidden state)``, checked once
at :func:`apply_scalegrad` (:func:`scalegrad.hf.check_linear_head`).

Labels are shifted inside (as the models' own loss does), ``ignore_index``
positions are left out, and the summed loss is divided by ``num_items_in_batch``
when the trainer passes it (exact gradient accumulation), else by the number of
scored tokens: ``ScaleGradLoss`` on the full logits, and with ``gamma=1`` the
model's own cross-entropy. Without labels the original forward runs, logits
included (evaluation, ``generate``).

TRL's ``SFTTrainer`` computes its loss from per-token log-probabilities that it
asks for with ``fused_lm_head=True`` (its own fused head, patched onto the model
when the trainer is built): patched after the trainer is built, this forward
answers that call too, with ScaleGrad's per-token ``log q(y)`` (whose sum
carries the fused gradient) and the token accuracy and entropy from the same pass.

The seam for other objectives of the same chunk loop: :func:`patch_fused_objective`
takes a factory of per-chunk objectives (see :class:`scalegrad.fused.ScaleGradChunks`)
and the settings that identify it; :func:`apply_scalegrad` is that call for ScaleGrad.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .fused import fused_linear_loss, scalegrad_objective
from .hf import check_linear_head, linear_head, unwrap
from .hf_trainer import IGNORE_INDEX
from .losses import check_gamma

__all__ = ["apply_scalegrad", "remove_scalegrad", "scalegrad_patched", "patch_fused_objective",
           "fused_patch_settings"]

_STATE = "_scalegrad_fused_patch"

# Config fields of models whose logits are transformed after the head, and the value
# that leaves them unchanged (None: any value other than None transforms them).
_LOGIT_TRANSFORMS = (
    ("final_logit_softcapping", None, "soft-caps its logits (final_logit_softcapping, Gemma-2/3)"),
    ("logit_scale", 1.0, "scales its logits (logit_scale, Cohere)"),
    ("logits_scaling", 1.0, "divides its logits by logits_scaling (Granite)"),
    ("output_multiplier", 1.0, "multiplies its logits by output_multiplier"),
    ("lm_head_multiplier", 1.0, "multiplies its logits by lm_head_multiplier"),
)


@dataclass
class _Patch:
    settings: tuple
    make_objective: object  # hidden -> a per-chunk objective (scalegrad.fused.ScaleGradChunks)
    chunk_size: int
    ignore_index: int
    head: torch.nn.Module
    signature: inspect.Signature
    previous_forward: object  # an instance attribute ``forward`` found on the model, or None
    forward: object = None
    guard: object = None
    active: int = 0
    keeps_logits: tuple = field(default_factory=tuple)


def _refuse(reason: str, fix: str):
    raise ValueError(f"apply_scalegrad: {reason}; {fix}")


def _patched_model(model):
    """The causal LM to patch: ``model`` itself, the model in a DDP wrapper, or a PEFT
    model's base model (so patching before or after ``get_peft_model`` is the same)."""
    model = unwrap(model)
    get_base = getattr(model, "get_base_model", None)
    if getattr(model, "peft_config", None) is not None and callable(get_base):
        model = get_base()
    return model


def fused_patch_settings(model):
    """The settings a model was patched with (``("scalegrad", gamma, ...)``), or None."""
    state = _patched_model(model).__dict__.get(_STATE)
    return state.settings if state is not None else None


def _check_patchable(model, name: str) -> tuple:
    """``(base, head)`` when the fused loss can replace the model's head; else one ValueError."""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        _refuse(f"{name} is an encoder-decoder model, which is not supported",
                "use ScaleGradLoss as the trainer's compute_loss_func")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, neutral, what in _LOGIT_TRANSFORMS:
        value = getattr(text_config, key, None)
        if value is not None and value != neutral:
            _refuse(f"{name} {what}, which the fused loss does not reproduce",
                    "use ScaleGradLoss as the trainer's compute_loss_func")
    try:
        base, head = linear_head(model)
    except ValueError as exc:
        _refuse(f"{name} cannot be patched: {exc}", "use ScaleGradLoss as the trainer's compute_loss_func "
                "(with LoRA, leave lm_head out of target_modules)")
    return base, head


def patch_fused_objective(model, make_objective, *, settings: tuple, chunk_size: int,
                          ignore_index: int = IGNORE_INDEX, check: bool = True):
    """Patch ``model`` (in place; returned) so that calls with labels return the loss of
    the per-chunk objective ``make_objective(hidden)`` (:mod:`scalegrad.fused`) over the
    model's head; :func:`apply_scalegrad` documents the behaviour. ``settings`` identify
    the objective: a second patch with the same settings changes nothing, with others it
    is refused. ``check``: run :func:`scalegrad.hf.check_linear_head` on a few tokens."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        _refuse(f"chunk_size must be an integer >= 1, got {chunk_size!r}", "pass chunk_size=256, say")
    target = _patched_model(model)
    name = type(target).__name__
    state = target.__dict__.get(_STATE)
    if state is not None:
        if state.settings == settings:
            return model
        _refuse(f"{name} is already patched with {state.settings}, not {settings}",
                "call scalegrad.remove_scalegrad(model) first")
    base, head = _check_patchable(target, name)
    if check:
        vocab = head.weight.shape[0]
        ids = torch.arange(min(8, vocab), device=head.weight.device).unsqueeze(0)
        try:
            check_linear_head(target, ids)
        except ValueError as exc:
            _refuse(f"{name} cannot be patched: {exc}", "use ScaleGradLoss as the trainer's compute_loss_func")
    signature = inspect.signature(type(target).forward)
    state = _Patch(settings=settings, make_objective=make_objective, chunk_size=chunk_size,
                   ignore_index=ignore_index, head=head, signature=signature,
                   previous_forward=target.__dict__.get("forward"),
                   keeps_logits=tuple(key for key in ("logits_to_keep", "num_logits_to_keep")
                                      if key in signature.parameters))
    original = target.forward

    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        state.active += 1
        try:
            return _forward(self, state, original, args, kwargs)
        finally:
            state.active -= 1

    def guard(module, args, kwargs=None):
        # TRL (and others) replace the model's forward; a training pass that reaches the
        # base model without going through this patch would silently not be ScaleGrad.
        if (state.active == 0 and target.training and torch.is_grad_enabled()
                and target.__dict__.get("forward") is not state.forward):
            raise RuntimeError(
                f"apply_scalegrad: {name}'s forward was replaced after apply_scalegrad (TRL's SFTTrainer does "
                f"so when it is built), so this training step would not use ScaleGrad; call "
                f"scalegrad.remove_scalegrad(model) and apply_scalegrad(trainer.model, ...) after building the "
                f"trainer")

    state.forward = types.MethodType(forward, target)
    target.forward = state.forward
    state.guard = base.register_forward_pre_hook(guard)
    target.__dict__[_STATE] = state
    return model


def apply_scalegrad(model, gamma: float, *, chunk_size: int = 256, ignore_index: int = IGNORE_INDEX,
                    eps: float = 1e-8, impl: str = "auto", check: bool = True):
    """Patch a Hugging Face causal LM (in place; returned) so that
    ``model(input_ids=..., labels=..., num_items_in_batch=None)`` returns the ScaleGrad
    loss (``gamma``, see docs/reference.md) from the fused chunked path, never making
    the ``(batch, time, vocab)`` logits; the output's ``logits`` are then None.

    ``model`` may be wrapped (DDP) or a PEFT model (its base model is patched: before
    or after ``get_peft_model`` is the same; LoRA on ``lm_head`` is refused). Labels
    are a copy of ``input_ids`` with ``ignore_index`` where not scored, shifted by one
    inside. ``chunk_size``: positions whose logits exist at a time; ``impl``: as in
    :func:`scalegrad.fused_linear_scalegrad_loss` (Triton per chunk on CUDA).

    Refused with one ``ValueError`` line, the model untouched: ``gamma`` not a finite
    number > 0, an encoder-decoder model, logits transformed after the head
    (soft-capping, ``logit_scale``, ``logits_scaling``), no linear output embedding,
    logits that are not ``head(last hidden state)`` (checked on a few tokens unless
    ``check=False``), or a model already patched with other settings. A head with a
    bias is handled exactly. Undo with :func:`remove_scalegrad`.
    """
    try:
        gamma = check_gamma(gamma)
    except (TypeError, ValueError) as exc:
        _refuse(str(exc), "pass gamma=0.2, say")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        _refuse(f"eps must be a number >= 0, got {eps!r}", "leave eps=1e-8")
    if impl not in ("auto", "torch", "triton"):
        _refuse(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}", "leave impl='auto'")
    return patch_fused_objective(
        model, functools.partial(scalegrad_objective, gamma, float(eps), impl),
        settings=("scalegrad", gamma, float(eps), impl, chunk_size, ignore_index),
        chunk_size=chunk_size, ignore_index=ignore_index, check=check)


def remove_scalegrad(model):
    """Undo :func:`apply_scalegrad` (or :func:`patch_fused_objective`): the model's
    original forward back, in place; returns the model. Raises ``ValueError`` when the
    model is not patched, or when its forward was replaced after the patch."""
    target = _patched_model(model)
    state = target.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"remove_scalegrad: {type(target).__name__} is not patched by apply_scalegrad")
    if target.__dict__.get("forward") is not state.forward:
        raise ValueError(f"remove_scalegrad: {type(target).__name__}'s forward was replaced after "
                         f"apply_scalegrad; undo that first")
    state.guard.remove()
    del target.__dict__[_STATE]
    if state.previous_forward is not None:
        target.forward = state.previous_forward
    else:
        del target.forward
    return model


@contextlib.contextmanager
def scalegrad_patched(model, gamma: float, **options):
    """``with scalegrad_patched(model, 0.2): ...``: :func:`apply_scalegrad` for the block."""
    apply_scalegrad(model, gamma, **options)
    try:
        yield model
    finally:
        remove_scalegrad(model)


def _as_keywords(signature, args, kwargs) -> dict:
    """Positional arguments of the model's forward as keywords (``self`` dropped)."""
    if not args:
        return kwargs
    bound = signature.bind_partial(None, *args, **kwargs).arguments
    bound.pop(next(iter(signature.parameters)))
    keywords = {}
    for key, value in bound.items():
        kind = signature.parameters[key].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            keywords.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError("apply_scalegrad: pass the model's inputs as keywords")
        else:
            keywords[key] = value
    return keywords


def _forward(model, state: _Patch, original, args, kwargs):
    kwargs = _as_keywords(state.signature, args, kwargs)
    fused_lm_head = kwargs.pop("fused_lm_head", False)  # TRL's SFTTrainer asks for per-token values
    labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        if fused_lm_head:
            raise ValueError("apply_scalegrad: fused_lm_head=True needs labels")
        return original(**kwargs)
    name = type(model).__name__
    if model.get_output_embeddings() is not state.head:
        raise RuntimeError(f"apply_scalegrad: {name}'s output embedding was replaced after apply_scalegrad "
                           f"(LoRA on lm_head, resize_token_embeddings?); call remove_scalegrad(model) and "
                           f"apply_scalegrad again")
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    reference = kwargs.get("input_ids")
    if reference is None:
        reference = kwargs.get("inputs_embeds")
    if shift_labels is not None:
        target = shift_labels
    else:
        if reference is None or tuple(labels.shape) != tuple(reference.shape[:2]):
            got = "no input_ids" if reference is None else f"input_ids of shape {tuple(reference.shape[:2])}"
            raise ValueError(f"apply_scalegrad: labels of shape {tuple(labels.shape)} do not match {got}; "
                             f"the labels must be a copy of input_ids ({state.ignore_index} where not scored)")
        target = F.pad(labels[:, 1:], (0, 1), value=state.ignore_index)
    for key in ("logits_to_keep", "num_logits_to_keep"):
        kwargs.pop(key, None)
        if key in state.keeps_logits:
            kwargs[key] = 0
    as_tuple = kwargs.get("return_dict") is False
    if as_tuple:
        kwargs["return_dict"] = True
    head, captured = state.head, {}

    def fused_head(hidden):
        if hidden.shape[:2] != target.shape:
            raise ValueError(f"apply_scalegrad: the head's input {tuple(hidden.shape)} does not match the "
                             f"targets {tuple(target.shape)}")
        captured["out"] = fused_linear_loss(
            hidden, head.weight, target.to(hidden.device), state.make_objective(hidden), bias=head.bias,
            ignore_index=state.ignore_index, chunk_size=state.chunk_size, statistics=bool(fused_lm_head),
            entropy=bool(fused_lm_head))
        return hidden.new_empty((*hidden.shape[:-1], 0))

    previous = head.__dict__.get("forward")
    head.forward = fused_head
    try:
        output = original(**kwargs)
    finally:
        if previous is not None:
            head.forward = previous
        else:
            del head.forward
    if "out" not in captured:
        raise RuntimeError(f"apply_scalegrad: {name}'s forward did not call its output embedding")
    valid = target.to(head.weight.device) != state.ignore_index
    if num_items_in_batch is None:
        denominator = valid.sum().clamp(min=1)
    else:
        denominator = num_items_in_batch
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(head.weight.device)
    if fused_lm_head:
        total, stats = captured["out"]
        return _trl_output(total, stats, target.to(valid.device), valid, denominator,
                           drop_last=shift_labels is None)
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    output = type(output)(loss=captured["out"] / denominator, **fields)
    return output.to_tuple() if as_tuple else output


class _PerTokenOfSum(torch.autograd.Function):
    """Per-token values whose gradient goes to the summed fused loss ``total``: exact when
    every scored token receives the same gradient (a sum, a mean), refused otherwise."""

    @staticmethod
    def forward(ctx, total, values, valid):
        ctx.save_for_backward(valid)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        (valid,) = ctx.saved_tensors
        scored = grad[valid]
        if scored.numel() == 0:
            return grad.new_zeros(()), None, None
        if not bool((scored == scored[0]).all()):
            raise RuntimeError("apply_scalegrad: the per-token log-probabilities of the fused ScaleGrad loss "
                               "carry the gradient of their sum only (SFTTrainer's loss_type='nll'); this "
                               "loss weighs the tokens differently")
        return -scored[0], None, None


@functools.lru_cache(maxsize=None)
def _output_class():
    from transformers.utils import ModelOutput

    @dataclass
    class ScaleGradFusedOutput(ModelOutput):
        """What TRL's ``SFTTrainer`` reads from ``model(..., fused_lm_head=True)``; every
        per-token field is zero where the label is ignored. ``log_probs`` is ScaleGrad's
        ``log q(y)`` (minus each token's loss)."""
        loss: torch.Tensor | None = None
        log_probs: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        is_top1: torch.Tensor | None = None
        label_mask: torch.Tensor | None = None
        aux_loss: torch.Tensor | None = None

    return ScaleGradFusedOutput


def _trl_output(total, stats, target, valid, denominator, *, drop_last: bool):
    shape = target.shape
    losses = stats["loss"].view(shape).to(total.dtype)
    log_probs = _PerTokenOfSum.apply(total, -losses.masked_fill(~valid, 0.0), valid)
    entropy = stats["entropy"].view(shape).masked_fill(~valid, 0.0)
    is_top1 = (stats["predictions"].view(shape) == target) & valid
    if drop_last:  # the stand-in target of the last position
        log_probs, entropy, is_top1, valid = (x[:, :-1] for x in (log_probs, entropy, is_top1, valid))
    return _output_class()(loss=total / denominator, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                           label_mask=valid)
