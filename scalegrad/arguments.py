"""What the library's public functions accept, checked in one place
(``docs/failure-behaviour.md``, the library).

A function that computes on tensors takes tensors and refuses anything else with a
``ValueError`` naming the shapes it takes; a function that counts token ids takes a
list (or tuple) or a 1-D tensor of them, and gives the same numbers for both. So a
list where a tensor is expected, or the reverse, either works identically or is
refused: never a different number.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def require_tensor(value: Any, name: str, function: str, shape: str) -> torch.Tensor:
    """``value`` itself when it is a tensor; else a ``ValueError`` naming ``shape``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{function}: {name} must be a torch.Tensor of shape {shape}, got "
                         f"{_describe(value)}")
    return value


def token_sequence(value: Any, function: str) -> list:
    """One sequence of tokens as a list: from a list or tuple (of ids, 0-d tensors or
    strings) or a 1-D tensor or array; anything else is a ``ValueError``."""
    accepted = "a list (or tuple) of token ids or a 1-D tensor"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 1:
            raise ValueError(f"{function} takes one sequence: {accepted}; got a {value.ndim}-D "
                             f"{type(value).__name__} of shape {tuple(value.shape)}")
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{function} takes one sequence: {accepted}; got {_describe(value)}")
    tokens = []
    for token in value:
        if isinstance(token, (torch.Tensor, np.ndarray, np.generic)):
            if token.ndim != 0:
                raise ValueError(f"{function} takes one sequence: {accepted}; got a list of "
                                 f"{token.ndim}-D {type(token).__name__}s")
            token = token.item()
        elif isinstance(token, (list, tuple, dict, set)):
            raise ValueError(f"{function} takes one sequence: {accepted}; got a list of "
                             f"{type(token).__name__}s")
        tokens.append(token)
    return tokens


def token_sequences(value: Any, function: str) -> list[list]:
    """Several sequences as lists: the rows of a 2-D tensor or array, or a list (or
    tuple) of sequences (each as :func:`token_sequence`); else a ``ValueError``."""
    accepted = "a 2-D tensor (one row per sequence) or a list of sequences"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 2:
            raise ValueError(f"{function} takes several sequences: {accepted}; got a "
                             f"{value.ndim}-D {type(value).__name__} of shape {tuple(value.shape)}")
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{function} takes several sequences: {accepted}; got {_describe(value)}")
    if value and not all(isinstance(row, (list, tuple, torch.Tensor, np.ndarray)) for row in value):
        raise ValueError(f"{function} takes several sequences: {accepted}; got one sequence of "
                         f"tokens (wrap it in a list)")
    return [token_sequence(row, function) for row in value]


def _describe(value: Any) -> str:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
