"""Builders for the tiny offline fixtures (see conftest.py); importable from tests.

Everything here is small and seeded: a byte-level BPE of a few hundred tokens
trained on the pydoc corpus, a 2-layer GPT-2 with random weights, and the corpus
tokenized into the three split files of the original data format.
"""

from __future__ import annotations

import os

import torch

from scalegrad import data, tokenization

TINY_VOCAB_SIZE = 400
TINY_N_POSITIONS = 1100


def build_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE trained on the pydoc corpus, saved with save_pretrained."""
    return tokenization.train_bpe_tokenizer(data.default_corpus_text(), vocab_size, out_dir)


def tiny_gpt2_config(vocab_size: int, *, n_positions: int = TINY_N_POSITIONS, eos_token_id=None):
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions,
                      vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id)


def build_tiny_model(vocab_size: int, *, seed: int = 0, n_positions: int = TINY_N_POSITIONS,
                     eos_token_id=None):
    """A random 2-layer GPT-2 whose weights depend only on ``seed`` (global RNG untouched)."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size, n_positions=n_positions,
                                                 eos_token_id=eos_token_id))
    return model.eval()


def save_tiny_model_dir(tokenizer, out_dir: str | os.PathLike, *, seed: int = 0) -> str:
    """The tiny model and its tokenizer saved together, as a checkpoint folder is."""
    model = build_tiny_model(len(tokenizer), seed=seed, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return os.fspath(out_dir)


def build_data_base(tokenizer, out_dir: str | os.PathLike, text: str | None = None,
                    valid_fraction: float = 0.05, test_fraction: float = 0.05) -> dict:
    """Tokenize ``text`` (default: the pydoc corpus) into the three split files.

    Returns the token tensors by split.
    """
    text = data.default_corpus_text() if text is None else text
    texts = data.split_corpus(text, valid_fraction, test_fraction)
    splits = tokenization.tokenize_splits(tokenizer, texts)
    data.save_splits(splits, out_dir)
    return splits


def make_fairseq_checkout(root: str | os.PathLike, package_dir: str | os.PathLike,
                          name: str = "custom"):
    """A stand-in for a fairseq git checkout with the package installed the original
    release's way: ``ROOT/fairseq/`` holds links to every entry of the installed
    fairseq package (so its ``logging/``, ``data/``, ``options.py`` ... are there to
    shadow other modules, as in a real checkout), and ``cp -r PACKAGE
    ROOT/fairseq/NAME`` (without ``__pycache__``). Returns ``(ROOT, the copy)``."""
    import shutil
    from pathlib import Path

    import fairseq

    root = Path(root)
    inner = root / "fairseq"
    inner.mkdir(parents=True)
    installed = Path(fairseq.__file__).resolve().parent
    for entry in installed.iterdir():
        if entry.name != "__pycache__":
            (inner / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    copy = inner / name
    shutil.copytree(package_dir, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return root, copy
