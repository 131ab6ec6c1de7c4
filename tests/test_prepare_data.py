"""scripts/prepare_data.py, run as a user runs it (a subprocess) on a small text."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalegrad import data
from scalegrad.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "prepare_data.py"


def run_script(*args, env=None):
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    text = data.default_corpus_text()
    text = text[: text.index("\n\n", 120_000) + 2]  # ~120 KB of real English, whole paragraphs
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def fairseq_missing():
    """Why fairseq cannot be used here, or None."""
    try:
        import fairseq  # noqa: F401
    except Exception as exc:  # not installed, or installed but broken on this Python
        return f"fairseq is not importable here: {exc}"
    return None


SPLIT_ARGS = ("--valid-fraction", 0.1, "--test-fraction", 0.1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus_file):
    """Offline (HF_HUB_OFFLINE=1) with the default ``--tokenizer gpt2``: falls back to a BPE."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    result = run_script("--input", corpus_file, "--output-dir", out, "--vocab-size", 300, *SPLIT_ARGS)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="module")
def prepared_again(tmp_path_factory, corpus_file):
    """The same text with ``--train-tokenizer``, and a fairseq data-bin when fairseq imports."""
    out = tmp_path_factory.mktemp("prepared_again") / "out"
    bin_args = [] if fairseq_missing() else ["--fairseq-data-bin", out.parent / "data-bin",
                                             "--fairseq-ids-per-line", 100]
    result = run_script("--input", corpus_file, "--output-dir", out, "--train-tokenizer",
                        "--vocab-size", 300, *SPLIT_ARGS, *bin_args)
    assert result.returncode == 0, result.stderr
    return out, result


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed_counts(stdout):
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+): (\d+) tokens", stdout, re.M)}
    vocab = int(re.search(r"vocabulary size: (\d+)", stdout).group(1))
    return counts, vocab


def test_writes_the_three_split_files_and_prints_counts(prepared):
    out, result = prepared
    counts, vocab = printed_counts(result.stdout)
    assert vocab == 300
    assert sorted(os.listdir(out)) == sorted([f"{s}_tokens_bpe_gpt2.pt" for s in data.SPLITS] + ["tokenizer"])
    for split in data.SPLITS:
        tokens = torch.load(data.split_path(out, split), weights_only=True)
        assert tokens.dim() == 1 and tokens.dtype == torch.int64
        assert counts[split] == tokens.numel() >= 3000
        assert 0 <= int(tokens.min()) and int(tokens.max()) < vocab
        assert torch.equal(data.load_split(data.split_path(out, split), vocab_size=vocab), tokens)


def test_ids_decode_back_to_the_text(prepared, corpus_file):
    from transformers import AutoTokenizer

    out, _ = prepared
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tokenizer) == 300
    texts = data.split_corpus(data.read_text_inputs([corpus_file]), 0.1, 0.1)
    decoded = {}
    for split in data.SPLITS:
        ids = torch.load(data.split_path(out, split), weights_only=True).tolist()
        decoded[split] = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        assert decoded[split] == texts[split]
    assert "".join(decoded.values()).strip() == corpus_file.read_text(encoding="utf-8").strip()


def test_deterministic_across_runs(prepared, prepared_again):
    (out, first), (again, second) = prepared, prepared_again
    assert printed_counts(second.stdout) == printed_counts(first.stdout)
    for split in data.SPLITS:
        assert torch.equal(torch.load(data.split_path(out, split), weights_only=True),
                           torch.load(data.split_path(again, split), weights_only=True))
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert (out / "tokenizer" / name).read_bytes() == (again / "tokenizer" / name).read_bytes()


def test_offline_hub_name_falls_back_to_training(prepared):
    out, result = prepared  # --tokenizer gpt2 is the default; HF_HUB_OFFLINE=1 keeps the hub out
    assert "cannot load the tokenizer 'gpt2'" in result.stderr
    assert "training a byte-level BPE" in result.stderr
    assert "tokenizer: " + str(out / "tokenizer") in result.stdout
    assert (out / "tokenizer" / "tokenizer.json").is_file()


def test_an_existing_tokenizer_folder_is_used_as_is(corpus_file, tmp_path, tiny_tokenizer_dir,
                                                    tiny_tokenizer, capsys):
    # in-process through main(), to spare a subprocess
    argv = ["--input", str(corpus_file), "--output-dir", str(tmp_path / "out"),
            "--tokenizer", tiny_tokenizer_dir, *map(str, SPLIT_ARGS)]
    assert load_script().main(argv) == 0
    assert not (tmp_path / "out" / "tokenizer").exists()
    assert printed_counts(capsys.readouterr().out)[1] == len(tiny_tokenizer)
    texts = data.split_corpus(data.read_text_inputs([corpus_file]), 0.1, 0.1)
    valid = torch.load(data.split_path(tmp_path / "out", "valid"), weights_only=True)
    assert valid.tolist() == tiny_tokenizer(texts["valid"], add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("args, words", [
    (["--input", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt does not exist"),
    (["--valid-fraction", "0.6", "--test-fraction", "0.5"], "nothing for training"),
    (["--vocab-size", "100", "--train-tokenizer"], "vocabulary size 100 is too small"),
    (["--tokenizer", "{tmp}/not-a-tokenizer"], "cannot load a tokenizer from"),
    (["--fairseq-ids-per-line", "0"], "--fairseq-ids-per-line"),
])
def test_bad_input_is_one_line_and_writes_nothing(corpus_file, tmp_path, capsys, args, words):
    (tmp_path / "not-a-tokenizer").write_text("junk")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--input" not in args:
        args = ["--input", str(corpus_file)] + args
    out = tmp_path / "out"
    assert load_script().main([*args, "--output-dir", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_exit_status_from_the_command_line(tmp_path):
    result = run_script("--input", tmp_path / "missing.txt", "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: input {tmp_path / 'missing.txt'} does not exist"]
    assert not (tmp_path / "out").exists()


def test_fairseq_data_bin(prepared_again):
    reason = fairseq_missing()
    if reason:
        pytest.skip(reason)
    from fairseq.data import Dictionary, data_utils

    out, result = prepared_again
    bin_dir = out.parent / "data-bin"
    assert "fairseq data-bin" in result.stdout
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        assert (bin_dir / name).is_file(), name
    dict_lines = (bin_dir / "dict.txt").read_text().splitlines()
    assert [line.split()[0] for line in dict_lines] == [str(i) for i in range(300)]
    dictionary = Dictionary.load(str(bin_dir / "dict.txt"))
    for split in data.SPLITS:
        tokens = torch.load(data.split_path(out, split), weights_only=True)
        dataset = data_utils.load_indexed_dataset(str(bin_dir / split), dictionary)
        assert len(dataset) == -(-tokens.numel() // 100)  # 100 ids per line
        stream = torch.cat([dataset[i] for i in range(len(dataset))])
        # every line ends with </s>; the rest is the ids shifted past the special symbols
        assert (stream == dictionary.eos()).sum() == len(dataset)
        ids = stream[stream != dictionary.eos()] - data.FAIRSEQ_NUM_SPECIAL
        assert torch.equal(ids, tokens)


def test_fairseq_data_bin_without_fairseq_is_a_user_error(corpus_file, tmp_path, capsys, monkeypatch):
    script = load_script()
    monkeypatch.setattr(data, "fairseq_available", lambda: False)  # the module scalegrad.cli calls
    assert script.main(["--input", str(corpus_file), "--output-dir", str(tmp_path / "out"),
                        "--fairseq-data-bin", str(tmp_path / "bin")]) == 2
    assert "needs fairseq" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "bin").exists()


# -- the library side: scalegrad.tokenization ---------------------------------------

def test_train_bpe_tokenizer_round_trips(tmp_path):
    from scalegrad import tokenization

    text = data.default_corpus_text()[:50_000]
    tokenizer = tokenization.train_bpe_tokenizer(text, 320, tmp_path / "tok")
    assert len(tokenizer) == 320
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "tok"))
    loaded = tokenization.load_tokenizer(tmp_path / "tok")
    assert len(loaded) == 320 and loaded.eos_token == tokenization.END_OF_TEXT
    ids = tokenization.encode_text(loaded, text)
    assert ids.dtype == torch.int64 and int(ids.max()) < 320
    assert tokenization.decode_ids(loaded, ids) == text
    with pytest.raises(UserError, match="too small"):
        tokenization.train_bpe_tokenizer(text, 200, tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_encode_text_in_pieces_gives_the_ids_of_the_whole_text(tiny_tokenizer):
    from scalegrad import tokenization

    text = data.default_corpus_text()[:200_000] + " x  \n\n  y\n\n\n\nz \n\n\tw\n\n" * 50
    whole = tokenization.encode_text(tiny_tokenizer, text, piece_chars=10**9)
    assert torch.equal(tokenization.encode_text(tiny_tokenizer, text, piece_chars=3000), whole)
    assert whole.tolist() == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from scalegrad import tokenization

    with pytest.raises(UserError, match="tokenizer folder /no/such/folder does not exist"):
        tokenization.load_tokenizer("/no/such/folder")
    (tmp_path / "junk").write_text("junk")
    with pytest.raises(UserError, match="cannot load a tokenizer from .*junk"):
        tokenization.load_tokenizer(tmp_path / "junk")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a tokenizer from .*empty"):
        tokenization.load_tokenizer(tmp_path / "empty")
    # a hub name: only the local cache is tried, the hub never contacted
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="'gpt2'.*needs internet access"):
        tokenization.load_tokenizer("gpt2")
