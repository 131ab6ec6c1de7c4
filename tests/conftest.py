"""Shared, session-scoped fixtures: a tiny tokenizer, model and data set, built offline.

The builders live in ``tests/helpers.py`` (and the library), so scripts and tests
make these things the same way. Building all three takes a few seconds (most of it
importing transformers).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import helpers

# The test models are tiny: one thread is several times faster than two fighting
# over a shared CPU (33 ms against 2 ms per forward pass measured here), and it
# keeps the runs deterministic. SCALEGRAD_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("SCALEGRAD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (vocabulary 400) trained on the pydoc corpus; its folder."""
    path = tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer"
    helpers.build_tiny_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tokenizer of ``tiny_tokenizer_dir``, loaded (do not modify it)."""
    from scalegrad.tokenization import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A seeded random 2-layer GPT-2 (n_embd 32, 1100 positions) saved with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_model") / "model"
    return helpers.save_tiny_model_dir(tiny_tokenizer, path)


@pytest.fixture(scope="session")
def tiny_data_base(tmp_path_factory, tiny_tokenizer):
    """The pydoc corpus in ``{train,valid,test}_tokens_bpe_gpt2.pt`` (>= 10k tokens each)."""
    path = tmp_path_factory.mktemp("tiny_data")
    helpers.build_data_base(tiny_tokenizer, path)
    return str(path)
