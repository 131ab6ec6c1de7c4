"""The model-based metrics of the 2022 papers (``docs/metrics-2022.md``): MAUVE on
features this package computes, and the two coherence scores.

* :func:`last_token_features`: a causal LM's final hidden state at each text's last
  token, as ``mauve-text``'s own featurizer (``mauve.utils.featurize_tokens_from_model``);
* :func:`mauve_score`: each reference/generation pair cut to the same number of
  featurizer tokens (the shorter one's, as Su and Collier's evaluation), then
  ``mauve.compute_mauve`` on the features (the ``eval`` extra);
* :func:`logprob_coherence`: the mean log-probability of the continuation's tokens
  given the prefix under an evaluator causal LM (Su and Collier 2022);
* :func:`simcse_coherence`: the cosine of the SimCSE embeddings of prefix and
  continuation (the contrastive decoding papers).

Models are given by hub name or local folder and loaded offline first
(:func:`load_pretrained`). Pure torch and transformers (and mauve-text for MAUVE).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import UserError, first_line

logger = logging.getLogger(__name__)

__all__ = ["EVAL_EXTRA_HINT", "require_mauve", "load_pretrained", "last_token_features",
           "cut_pairs", "mauve_score", "logprob_coherence", "simcse_coherence"]

EVAL_EXTRA_HINT = 'pip install "scalegrad[eval]"'


def require_mauve():
    """The ``mauve`` module, or one :class:`UserError` line naming the extra."""
    try:
        import faiss  # noqa: F401
        import mauve
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"MAUVE needs the eval extra (mauve-text, faiss-cpu, scikit-learn), "
                        f"which is not installed here ({exc.name or exc} missing): "
                        f"{EVAL_EXTRA_HINT}") from None
    return mauve


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def load_pretrained(source: str, role: str, *, kind: str = "base", device: str = "cpu",
                    models: dict | None = None):
    """``(model, tokenizer)`` from a hub name or a local folder, in evaluation mode.

    ``kind``: ``base`` (``AutoModel``, what mauve-text featurizes with and SimCSE
    encodes with) or ``causal`` (``AutoModelForCausalLM``). A hub name is taken from
    the local cache first; one that is not there (and cannot be downloaded) or a
    folder that does not exist is one :class:`UserError` line: ``{role} {source}: not
    found locally``. ``models`` caches what was loaded.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from .tokenization import from_pretrained_local_first, load_tokenizer

    key = (kind, source, device)
    if models is not None and key in models:
        return models[key]
    name = os.path.expanduser(os.fspath(source))
    loader = AutoModelForCausalLM if kind == "causal" else AutoModel
    if os.path.exists(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{role} {source}: no config.json there (expected a model folder "
                            f"written by save_pretrained)")
        try:
            model = loader.from_pretrained(name)
        except Exception as exc:
            raise UserError(f"{role} {source}: cannot load a model from it: "
                            f"{first_line(exc)}") from None
    elif _looks_like_path(name):
        raise UserError(f"{role} {source}: not found locally (no such folder)")
    else:
        try:
            model = from_pretrained_local_first(
                loader, name,
                lambda why: f"{role} {source}: not found locally (not a folder, not in the "
                            f"Hugging Face cache) and {why}; download it once or pass a local "
                            f"folder")
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"{role} {source}: not found locally and cannot be downloaded: "
                            f"{first_line(exc)}") from None
    tokenizer = load_tokenizer(name)
    model = model.float().to(device).eval()
    if models is not None:
        models[key] = (model, tokenizer)
    return model, tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _batches(n: int, batch_size: int, desc: str):
    from tqdm.auto import tqdm

    starts = range(0, n, max(1, batch_size))
    return tqdm(starts, desc=desc, unit="batch", disable=len(starts) < 4, leave=False)


def _right_padded(rows: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- #
# MAUVE
# --------------------------------------------------------------------------- #

@torch.no_grad()
def last_token_features(model, token_lists: Sequence[Sequence[int]], *,
                        batch_size: int = 8) -> np.ndarray:
    """``(n, hidden)`` float32: the last layer's hidden state (``hidden_states[-1]``) at
    each list's last token, the lists right-padded with id 0 under an attention mask:
    mauve-text's ``featurize_tokens_from_model``. Every list must be non-empty."""
    device = next(model.parameters()).device
    features = []
    for start in _batches(len(token_lists), batch_size, "Featurizing"):
        rows = token_lists[start:start + batch_size]
        ids, mask = _right_padded(rows, device)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                    return_dict=True)
        last = out.hidden_states[-1]
        lengths = torch.tensor([len(r) for r in rows], device=device)
        features.append(last[torch.arange(len(rows), device=device), lengths - 1].float().cpu())
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    return torch.cat(features).numpy() if features else np.zeros((0, hidden), np.float32)


def cut_pairs(tokenizer, references: Sequence[str], generations: Sequence[str],
              max_text_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """The featurizer's token ids of each (reference, generation) pair, both cut to the
    shorter one's length and to ``max_text_length`` (Su and Collier's ``parse_text``,
    on ids: no decoding and re-encoding); a pair whose cut generation is empty or only
    whitespace is dropped, as their ``evaluate_one_instance`` drops it."""
    kept_refs, kept_gens = [], []
    for reference, generation in zip(references, generations):
        ref_ids, gen_ids = _encode(tokenizer, reference), _encode(tokenizer, generation)
        length = min(len(ref_ids), len(gen_ids), max_text_length)
        if length > 0 and tokenizer.decode(gen_ids[:length]).strip():
            kept_refs.append(ref_ids[:length])
            kept_gens.append(gen_ids[:length])
    return kept_refs, kept_gens


def mauve_score(references: Sequence[str], generations: Sequence[str], featurizer: str, *,
                max_text_length: int = 200, mauve_scaling_factor: float = 5.0, seed: int = 25,
                num_buckets: int | str = "auto", batch_size: int = 8, device: str = "cpu",
                models: dict | None = None) -> float:
    """MAUVE (Pillutla et al. 2021) of ``generations`` against ``references`` (aligned
    by prefix), on :func:`last_token_features` of :func:`cut_pairs` under the
    ``featurizer`` causal LM; ``mauve.compute_mauve(p_features=references,
    q_features=generations, ...)`` with the other settings at mauve-text's defaults.
    A fraction in [0, 1] (the papers often print it times 100)."""
    mauve = require_mauve()
    if len(references) != len(generations):
        raise UserError(f"MAUVE pairs each generation with its reference: {len(references)} "
                        f"references for {len(generations)} generations")
    if max_text_length < 1:
        raise UserError(f"max_text_length must be at least 1, got {max_text_length}")
    pairs = sum(1 for reference, generation in zip(references, generations)
                if reference and generation.strip())
    if pairs < 2:  # before any model is loaded
        raise UserError(f"MAUVE needs at least 2 non-empty generations with references, got "
                        f"{pairs}")
    model, tokenizer = load_pretrained(featurizer, "featurizer", kind="base", device=device,
                                       models=models)
    refs, gens = cut_pairs(tokenizer, references, generations, max_text_length)
    if len(gens) < 2:
        raise UserError(f"MAUVE needs at least 2 non-empty generations with references, got "
                        f"{len(gens)}")
    p_features = last_token_features(model, refs, batch_size=batch_size)
    q_features = last_token_features(model, gens, batch_size=batch_size)
    out = mauve.compute_mauve(p_features=p_features, q_features=q_features,
                              mauve_scaling_factor=mauve_scaling_factor, seed=seed,
                              num_buckets=num_buckets, verbose=False)
    return float(out.mauve)


# --------------------------------------------------------------------------- #
# Coherence
# --------------------------------------------------------------------------- #

def _scored_pairs(prefixes, continuations):
    """The pairs whose continuation has a whitespace token (the others are skipped,
    as Su and Collier's ``compute_coherence.py`` skips them)."""
    return [(p, c) for p, c in zip(prefixes, continuations) if c.strip().split()]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prefix: str, continuation: str) -> torch.Tensor:
    """Per continuation token, ``log p(token | bos, prefix, earlier tokens)`` (float32)
    under a causal LM, one row alone: the dense definition the batched code equals."""
    context = _context_ids(tokenizer, prefix)
    target = _encode(tokenizer, continuation)
    ids = torch.tensor([context + target], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[0, len(context) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(context):, None])[:, 0]


def _context_ids(tokenizer, prefix: str) -> list[int]:
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + _encode(tokenizer, prefix)


@torch.no_grad()
def logprob_coherence(prefixes: Sequence[str], continuations: Sequence[str], evaluator: str, *,
                      batch_size: int = 8, device: str = "cpu",
                      models: dict | None = None) -> float:
    """Su and Collier's coherence: per pair, the mean over the continuation's tokens of
    ``log p(token | bos + prefix + earlier continuation tokens)`` under the
    ``evaluator`` causal LM (natural log); the mean over the pairs whose continuation
    is not empty. Batched with right padding (each row equals its one-row value,
    :func:`continuation_logprobs`)."""
    model, tokenizer = load_pretrained(evaluator, "coherence model", kind="causal",
                                       device=device, models=models)
    pairs = _scored_pairs(prefixes, continuations)
    if not pairs:
        raise UserError("coherence: every continuation is empty")
    rows = [(_context_ids(tokenizer, p), _encode(tokenizer, c)) for p, c in pairs]
    if any(not context for context, _ in rows):
        raise UserError("coherence: an empty prefix and a coherence model without a bos token "
                        "leave nothing to condition the first token on")
    positions = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(c) + len(t) for c, t in rows)
    if isinstance(positions, int) and longest > positions:
        raise UserError(f"coherence: a prefix + continuation of {longest} tokens is longer than "
                        f"the coherence model's {positions} positions")
    means = []
    for start in _batches(len(rows), batch_size, "Coherence"):
        batch = rows[start:start + batch_size]
        ids, mask = _right_padded([c + t for c, t in batch], device)
        lprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (context, target) in enumerate(batch):
            steps = torch.arange(len(context) - 1, len(context) + len(target) - 1, device=device)
            values = lprobs[i, steps, torch.tensor(target, device=device)]
            means.append(values.mean().item())
    return float(np.mean(means))


@torch.no_grad()
def simcse_embeddings(model, tokenizer, texts: Sequence[str], *, pooler: str,
                      batch_size: int = 8, max_length: int = 128) -> torch.Tensor:
    """Unit-length sentence embeddings as SimCSE's ``tool.encode``: at most
    ``max_length`` tokens (with the tokenizer's special tokens), ``pooler_output``
    (``cls``) or the first token's last hidden state (``cls_before_pooler``)."""
    device = next(model.parameters()).device
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = []
    for start in _batches(len(texts), batch_size, "SimCSE"):
        inputs = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                           max_length=max_length, return_tensors="pt").to(device)
        outputs = model(**inputs, return_dict=True)
        if pooler == "cls":
            if getattr(outputs, "pooler_output", None) is None:
                raise UserError("simcse-coherence: the encoder has no pooler output; use "
                                "the cls_before_pooler pooler")
            embeddings = outputs.pooler_output
        else:
            embeddings = outputs.last_hidden_state[:, 0]
        embeddings = embeddings.float()
        out.append(embeddings / embeddings.norm(dim=1, keepdim=True))
    return torch.cat(out)


def simcse_coherence(prefixes: Sequence[str], continuations: Sequence[str], encoder: str, *,
                     pooler: str = "auto", batch_size: int = 8, device: str = "cpu",
                     models: dict | None = None) -> float:
    """The contrastive decoding papers' coherence: the mean over the pairs of the cosine
    of the SimCSE embeddings of prefix and continuation (``simcse.SimCSE.similarity``'s
    diagonal). ``pooler='auto'``: ``cls_before_pooler`` for an unsupervised SimCSE
    model (``unsup`` in its name), else ``cls``, as SimCSE's tool."""
    if pooler == "auto":
        pooler = "cls_before_pooler" if "unsup" in Path(encoder).name else "cls"
    if pooler not in ("cls", "cls_before_pooler"):
        raise UserError(f"simcse pooler must be auto, cls or cls_before_pooler, got {pooler!r}")
    if not prefixes:
        raise UserError("simcse-coherence: no texts")
    model, tokenizer = load_pretrained(encoder, "simcse model", kind="base", device=device,
                                       models=models)
    a = simcse_embeddings(model, tokenizer, prefixes, pooler=pooler, batch_size=batch_size)
    b = simcse_embeddings(model, tokenizer, continuations, pooler=pooler, batch_size=batch_size)
    return float((a * b).sum(dim=1).mean())
