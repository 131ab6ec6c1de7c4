"""scalegrad.data: the split files, chunks, prefixes, raw text and the corpus split."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scalegrad import data
from scalegrad.errors import UserError
from tests.references import original_chunks, original_prefix_batch


# -- the .pt files ----------------------------------------------------------------

def test_split_path_names_the_original_files(tmp_path):
    assert data.SPLITS == ("train", "valid", "test")
    for split in data.SPLITS:
        assert data.split_path(tmp_path, split) == os.path.join(str(tmp_path), f"{split}_tokens_bpe_gpt2.pt")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_load_split_accepts_any_integer_dtype(tmp_path, dtype):
    path = tmp_path / "t.pt"
    torch.save(torch.tensor([5, 0, 7, 7], dtype=dtype), path)
    tokens = data.load_split(path, vocab_size=8)
    assert tokens.dtype == torch.int64 and tokens.tolist() == [5, 0, 7, 7]


def test_save_split_writes_1d_int64_atomically(tmp_path):
    path = tmp_path / "sub" / "x.pt"
    data.save_split(torch.arange(10, dtype=torch.int32)[2:6], path)
    loaded = torch.load(path, weights_only=True)
    assert loaded.dtype == torch.int64 and loaded.tolist() == [2, 3, 4, 5]
    assert os.listdir(path.parent) == ["x.pt"]  # no temporary left behind


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_file(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "garbage":
        path.write_bytes(b"this is not a torch file at all\n")
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump(_Exploit(str(tmp_path / "pwned")), f)
    elif kind == "torch_pickle":
        torch.save({"tokens": _Exploit(str(tmp_path / "pwned"))}, path)
    elif kind == "dict":
        torch.save({"tokens": torch.arange(5)}, path)
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "2d":
        torch.save(torch.zeros(2, 3, dtype=torch.long), path)
    elif kind == "float":
        torch.save(torch.zeros(4), path)
    elif kind == "bool":
        torch.save(torch.zeros(4, dtype=torch.bool), path)
    elif kind == "empty":
        torch.save(torch.zeros(0, dtype=torch.long), path)
    elif kind == "negative":
        torch.save(torch.tensor([1, -3, 2]), path)
    elif kind == "too_large":
        torch.save(torch.tensor([1, 50, 2]), path)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind, words", [
    ("missing", "does not exist"),
    ("folder", "not a file"),
    ("garbage", "cannot be loaded"),
    ("pickle", "cannot be loaded"),
    ("torch_pickle", "refused"),
    ("dict", "holds a dict"),
    ("list", "holds a list"),
    ("2d", "shape (2, 3)"),
    ("float", "torch.float32"),
    ("bool", "torch.bool"),
    ("empty", "no tokens"),
    ("negative", "negative token id (-3)"),
    ("too_large", "token id 50"),
])
def test_load_split_refuses_bad_files_with_one_line(tmp_path, kind, words):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(UserError) as info:
        data.load_split(path, vocab_size=10)
    message = str(info.value)
    assert str(path) in message and words in message
    assert "\n" not in message
    assert not (tmp_path / "pwned").exists()  # a crafted pickle is never executed


def test_load_split_without_vocab_size_skips_the_upper_bound(tmp_path):
    path = _bad_file(tmp_path, "too_large")
    assert data.load_split(path).tolist() == [1, 50, 2]


# -- chunks and prefixes ------------------------------------------------------------

@pytest.mark.parametrize("length, n", [(10, 1), (10, 4), (11, 4), (301, 300), (1000, 300), (1025, 1024)])
def test_chunk_tokens_is_the_original_view(length, n):
    tokens = torch.randint(0, 50, (length,))
    chunks = data.chunk_tokens(tokens, n)
    expected = original_chunks(tokens, n)
    assert chunks.dtype == torch.int64 and chunks.shape == (length // (n + 1), n + 1)
    assert torch.equal(chunks, expected)
    assert torch.equal(chunks.flatten(), tokens[: chunks.numel()])  # from the start, tail dropped


def test_chunk_tokens_too_short_says_what_is_needed():
    with pytest.raises(UserError, match=r"has 300 tokens, fewer than the 301 needed"):
        data.chunk_tokens(torch.arange(300), 300)
    with pytest.raises(UserError):
        data.chunk_tokens(torch.arange(300), 0)


def test_load_chunks_reads_the_split_file(tmp_path):
    data.save_split(torch.arange(23), data.split_path(tmp_path, "valid"))
    chunks = data.load_chunks(tmp_path, "valid", 4, vocab_size=23)
    assert chunks.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    with pytest.raises(UserError, match="valid_tokens_bpe_gpt2.pt"):
        data.load_chunks(tmp_path, "valid", 30)
    with pytest.raises(UserError, match="test_tokens_bpe_gpt2.pt.*does not exist"):
        data.load_chunks(tmp_path, "test", 4)
    with pytest.raises(UserError, match="unknown split"):
        data.load_chunks(tmp_path, "dev", 4)


@pytest.mark.parametrize("chunk_len, prefix_length", [(301, 50), (301, 300), (11, 3), (10, 5), (7, 1)])
def test_make_prefixes_matches_the_original_chunk_by_chunk(chunk_len, prefix_length):
    chunks = torch.randint(0, 1000, (4, chunk_len))
    prefixes = data.make_prefixes(chunks, prefix_length)
    expected = torch.cat([original_prefix_batch(chunk[None], prefix_length) for chunk in chunks])
    assert prefixes.shape == (4 * (chunk_len // prefix_length), prefix_length)
    assert torch.equal(prefixes, expected)


def test_make_prefixes_paper_setting_gives_six_per_chunk():
    chunks = data.chunk_tokens(torch.arange(301 * 3 + 17), 300)
    prefixes = data.make_prefixes(chunks, 50)
    assert prefixes.shape == (18, 50)
    assert prefixes[5].tolist() == list(range(250, 300))  # last window of chunk 0, token 300 dropped
    assert prefixes[6].tolist() == list(range(301, 351))  # chunk 1 starts a new window


@pytest.mark.parametrize("prefix_length", [0, -1, 301, 400])
def test_make_prefixes_refuses_prefixes_not_shorter_than_the_chunk(prefix_length):
    with pytest.raises(UserError, match="prefix length"):
        data.make_prefixes(torch.zeros(2, 301, dtype=torch.long), prefix_length)


def test_write_id_lines(tmp_path):
    path = tmp_path / "ids.txt"
    assert data.write_id_lines(torch.arange(25), path, 10) == 3
    assert path.read_text() == "0 1 2 3 4 5 6 7 8 9\n10 11 12 13 14 15 16 17 18 19\n20 21 22 23 24\n"
    tokens = torch.randint(0, 9, (1_000_003,))
    assert data.write_id_lines(tokens, path, 300) == 3334
    lines = path.read_text().splitlines()
    assert all(len(line.split()) == 300 for line in lines[:-1])
    assert [int(x) for line in lines for x in line.split()] == tokens.tolist()


# -- raw text -------------------------------------------------------------------------

def test_default_corpus_text_is_fixed_english():
    from pydoc_data.topics import topics

    text = data.default_corpus_text()
    assert text == data.default_corpus_text()
    assert len(text) > 400_000
    first = sorted(topics)[0]
    assert text.startswith(topics[first].strip("\n"))
    assert " the " in text and text.count("\n\n") > 1000


def test_read_text_inputs_files_and_folders(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed\n", encoding="utf-8")
    (tmp_path / "b" / "deep").mkdir()
    (tmp_path / "b" / "deep" / "a.txt").write_text("deep a\n", encoding="utf-8")
    (tmp_path / "b" / "skip.md").write_text("not text\n", encoding="utf-8")
    (tmp_path / "one.txt").write_text("first\n\n", encoding="utf-8")
    text = data.read_text_inputs([tmp_path / "one.txt", tmp_path / "b"])
    assert text == "first\n\ndeep a\n\nzed\n"


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"),
    ("empty_folder", "no .txt files"),
    ("blank", "no text found"),
    ("binary", "not UTF-8"),
])
def test_read_text_inputs_errors(tmp_path, case, words):
    path = tmp_path / case
    if case == "empty_folder":
        path.mkdir()
    elif case == "blank":
        path.write_text("\n  \n", encoding="utf-8")
    elif case == "binary":
        path.write_bytes(b"ok\xff\xfe\x00bad")
    with pytest.raises(UserError, match=words):
        data.read_text_inputs([path])
    with pytest.raises(UserError):
        data.read_text_inputs([])


def test_split_corpus_cuts_at_paragraphs_in_order():
    paragraphs = [f"paragraph {i} " + "word " * (i % 7 + 3) for i in range(100)]
    text = "\n\n".join(paragraphs) + "\n"
    parts = data.split_corpus(text, 0.1, 0.2)
    assert list(parts) == ["train", "valid", "test"]
    assert parts["train"] + parts["valid"] + parts["test"] == text
    assert parts["valid"].startswith("paragraph ") and parts["test"].startswith("paragraph ")
    assert parts["train"].endswith("\n\n") and parts["valid"].endswith("\n\n")
    for name, fraction in (("valid", 0.1), ("test", 0.2)):
        assert abs(len(parts[name]) / len(text) - fraction) < 0.02
    assert data.split_corpus(text, 0.1, 0.2) == parts


def test_split_corpus_falls_back_to_lines_then_words():
    lines = "\n".join(f"line {i}" for i in range(50))
    parts = data.split_corpus(lines, 0.1, 0.1)
    assert "".join(parts.values()) == lines and parts["test"].startswith("line ")
    words = " ".join(f"w{i}" for i in range(50))
    parts = data.split_corpus(words, 0.1, 0.1)
    assert "".join(parts.values()) == words and parts["valid"].startswith("w")


@pytest.mark.parametrize("valid, test, words", [
    (0.0, 0.1, "valid fraction"), (0.1, 1.0, "test fraction"), (0.5, 0.5, "nothing for training"),
    (-0.1, 0.1, "valid fraction"),
])
def test_split_corpus_refuses_bad_fractions(valid, test, words):
    with pytest.raises(UserError, match=words):
        data.split_corpus("a\n\nb\n\nc\n\nd", valid, test)


def test_split_corpus_refuses_text_too_short():
    with pytest.raises(UserError, match="too short"):
        data.split_corpus("one two", 0.1, 0.1)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab \n", max_size=80), st.floats(0.01, 0.45), st.floats(0.01, 0.45))
def test_split_corpus_always_partitions_the_text(text, valid, test):
    try:
        parts = data.split_corpus(text, valid, test)
    except UserError:
        return
    assert parts["train"] + parts["valid"] + parts["test"] == text
    assert all(part.strip() for part in parts.values())


# -- the shared fixture ---------------------------------------------------------------

def test_tiny_data_base_fixture(tiny_data_base, tiny_tokenizer):
    sizes = {}
    for split in data.SPLITS:
        tokens = data.load_split(data.split_path(tiny_data_base, split), vocab_size=len(tiny_tokenizer))
        sizes[split] = tokens.numel()
    assert min(sizes.values()) >= 5000
    assert sizes["train"] > sizes["valid"]
