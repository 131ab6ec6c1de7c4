"""The optimiser and schedule of the original driver.

The original used ``pytorch_transformers.AdamW`` (bias correction on) over two
parameter groups, and ``WarmupLinearSchedule``. That AdamW differs from
``torch.optim.AdamW`` in two small ways: ``eps`` is added to ``sqrt(v)`` before the
bias correction is folded into the step size, and the decoupled weight decay is
applied after the Adam update (to the updated weights). :class:`OriginalAdamW`
does exactly that; ``--adamw torch`` picks ``torch.optim.AdamW`` instead.
``transformers.get_linear_schedule_with_warmup`` is the same function of the step
as ``WarmupLinearSchedule``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

#: Parameters whose names contain one of these get no weight decay (the original's
#: list; GPT-2 names its layer norms ``ln_*``, so in practice only biases match).
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


class OriginalAdamW(torch.optim.Optimizer):
    """AdamW as ``pytorch_transformers`` 1.x implemented it (``correct_bias=True``).

    Per step ``t`` with gradient ``g``::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - lr * sqrt(1 - beta2**t) / (1 - beta1**t) * m / (sqrt(v) + eps)
        p = p - lr * weight_decay * p
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas {betas}")
        if eps < 0.0:
            raise ValueError(f"invalid eps {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("OriginalAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step = state["step"]
                    step_size = step_size * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def parameter_groups(named_parameters: Iterable, weight_decay: float) -> list[dict]:
    """The original's two groups: decayed, then not decayed (names in :data:`NO_DECAY`)."""
    named = list(named_parameters)
    return [
        {"params": [p for n, p in named if not any(nd in n for nd in NO_DECAY)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in named if any(nd in n for nd in NO_DECAY)],
         "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, *, learning_rate: float, adam_epsilon: float,
                    weight_decay: float, kind: str = "original") -> torch.optim.Optimizer:
    groups = parameter_groups(model.named_parameters(), weight_decay)
    if kind == "original":
        return OriginalAdamW(groups, lr=learning_rate, eps=adam_epsilon)
    if kind == "torch":
        return torch.optim.AdamW(groups, lr=learning_rate, eps=adam_epsilon)
    raise ValueError(f"unknown optimizer kind {kind!r}")


def build_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int):
    """Linear warm-up over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                           num_training_steps=total_steps)
