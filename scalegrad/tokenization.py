"""Tokenizers: load a Hugging Face one, or train a small byte-level BPE offline.

The paper's data is GPT-2 BPE ids. Where the ``gpt2`` tokenizer cannot be
downloaded (no internet), a byte-level BPE of the same kind is trained with the
``tokenizers`` library and saved as a Hugging Face tokenizer directory, so the rest
of the code (``AutoTokenizer.from_pretrained(dir)``, ``decode``) works unchanged.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

import torch

from .errors import UserError, first_line
from .io import atomic_path

#: GPT-2's only special token; it is also its bos, eos and unk token.
END_OF_TEXT = "<|endoftext|>"

#: A byte-level BPE starts from the 256 bytes and the special token.
MIN_BPE_VOCAB_SIZE = 256 + 1


def train_bpe_tokenizer(text: str, vocab_size: int, out_dir: str | os.PathLike, *,
                        min_frequency: int = 2):
    """Train a byte-level BPE on ``text`` and save it as a Hugging Face tokenizer.

    The ``tokenizers`` library's ``ByteLevelBPETokenizer`` learns the merges
    (special token ``<|endoftext|>``, as GPT-2); its ``vocab.json`` and
    ``merges.txt`` are turned into a ``GPT2TokenizerFast`` and saved with
    ``save_pretrained`` into ``out_dir`` (replaced atomically). Returns that
    tokenizer. Training is deterministic: the same text gives the same files.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise UserError(f"vocabulary size {vocab_size} is too small for a byte-level BPE; "
                        f"it needs at least {MIN_BPE_VOCAB_SIZE} (256 bytes + {END_OF_TEXT})")
    if not text.strip():
        raise UserError("no text to train the tokenizer on")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_paragraphs(text), vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[END_OF_TEXT], show_progress=False)
    with atomic_path(out_dir, is_dir=True) as tmp:
        bpe.save_model(str(tmp))
        # vocab=/merges= (not vocab_file=/merges_file=, silently ignored by transformers 5)
        tokenizer = GPT2TokenizerFast(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"),
                                      bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                      unk_token=END_OF_TEXT)
        if len(tokenizer) <= 1:
            raise RuntimeError(f"the trained tokenizer came out empty (length {len(tokenizer)})")
        tokenizer.save_pretrained(str(tmp))
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained``, with failures turned into a :class:`UserError`.

    A local folder is loaded as is. A hub name is looked up in the local cache
    first; when it is not there and the hub's host cannot even be resolved (no
    internet), the error comes at once instead of after the hub client's retries.
    """
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    is_local = Path(name).exists()
    if not is_local and (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1):
        raise UserError(f"tokenizer folder {name} does not exist")
    try:
        if is_local:
            tokenizer = AutoTokenizer.from_pretrained(name)
        else:
            tokenizer = from_pretrained_local_first(
                AutoTokenizer, name,
                lambda why: f"cannot load the tokenizer {name!r}: it is not in the local cache and "
                            f"{why}; a hub name needs internet access; pass a local tokenizer "
                            f"folder instead")
    except UserError:
        raise
    except Exception as exc:
        detail = first_line(exc)
        if is_local:
            raise UserError(f"cannot load a tokenizer from {name}: {detail} (expected a "
                            f"folder written by save_pretrained)") from None
        raise UserError(f"cannot load the tokenizer {name!r}: {detail}; a hub name needs "
                        f"internet access; pass a local tokenizer folder instead") from None
    if len(tokenizer) <= 1:
        raise UserError(f"the tokenizer loaded from {name} is empty (length {len(tokenizer)})")
    return tokenizer


def from_pretrained_local_first(loader, name: str, unreachable_message):
    """``loader.from_pretrained(name)`` (``loader``: ``AutoTokenizer``, ``AutoModel``, ...)
    for a hub name: from the local Hugging Face cache first; when it is not there and
    the hub surely cannot be reached, ``UserError(unreachable_message(why))`` at once
    (instead of after the hub client's retries); otherwise from the hub, whose
    exception, if any, propagates. The one local-first loading of the package
    (tokenizers here, the evaluation models in :mod:`scalegrad.model_metrics`)."""
    try:
        return loader.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache, whatever the exception type
        why = _hub_unreachable()
        if why:
            raise UserError(unreachable_message(why)) from None
    return loader.from_pretrained(name)


def _hub_unreachable() -> str | None:
    """Why the model hub surely cannot be reached, or None when it might be."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # the proxy resolves names, not us
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"the host {host} cannot be resolved"
    return None


def encode_text(tokenizer, text: str, *, piece_chars: int = 1 << 20) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens added.

    A GPT-2 style byte-level tokenizer (no normaliser, GPT-2's split regex, no
    prefix space) gives the same ids for a text as for its paragraphs one after
    the other, when they are cut just before a blank line; a long text is then
    encoded in pieces of about ``piece_chars`` characters, so a corpus the size of
    WikiText-103 does not need gigabytes of per-token Python objects at once.
    Any other tokenizer gets the whole text in one call.
    """
    if len(text) <= piece_chars or not _cuts_at_paragraphs_safely(tokenizer):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)
    pieces = list(_pieces(text, piece_chars))
    parts = []
    for start in range(0, len(pieces), 8):
        batch = tokenizer(pieces[start:start + 8], add_special_tokens=False, verbose=False)
        parts.extend(torch.tensor(ids, dtype=torch.int64) for ids in batch["input_ids"])
    return torch.cat(parts)


def _cuts_at_paragraphs_safely(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return False
    pre_tokenizer = backend.pre_tokenizer
    return (type(pre_tokenizer).__name__ == "ByteLevel"
            and getattr(pre_tokenizer, "use_regex", False) is True
            and getattr(pre_tokenizer, "add_prefix_space", True) is False)


def _pieces(text: str, piece_chars: int):
    """Consecutive pieces of about ``piece_chars`` characters, cut at paragraphs."""
    piece = []
    size = 0
    for paragraph in _paragraphs(text):
        piece.append(paragraph)
        size += len(paragraph)
        if size >= piece_chars:
            yield "".join(piece)
            piece, size = [], 0
    if piece:
        yield "".join(piece)


def decode_ids(tokenizer, ids) -> str:
    """The exact text of ``ids`` (no clean-up of spaces around punctuation)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def tokenize_splits(tokenizer, texts: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``encode_text`` for every split; a split that gives no tokens is a UserError."""
    splits = {}
    for split, text in texts.items():
        splits[split] = encode_text(tokenizer, text)
        if splits[split].numel() == 0:
            raise UserError(f"the {split} split has no tokens; give more text")
    return splits


# Just before a blank line that follows a non-space character: cutting there gives
# the same pre-tokens (GPT-2's regex) as the whole text would, because no pattern
# looks across that point.
_PARAGRAPH_CUT = re.compile(r"(?<=\S)(?=\n\n)")


def _paragraphs(text: str):
    # Paragraphs rather than one huge string keep memory flat and let the trainer
    # count words in parallel, with exactly the counts of the whole text.
    start = 0
    for match in _PARAGRAPH_CUT.finditer(text):
        yield text[start:match.start()]
        start = match.start()
    yield text[start:]
