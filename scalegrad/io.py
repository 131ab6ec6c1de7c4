"""Crash-consistent writes: at every instant the newest complete copy of a file or
folder can be found, and a reader never sees a half-written one
(``docs/failure-behaviour.md``).

Everything is written under a temporary name beside its place, flushed to disk and
renamed into place. For a file that is one ``os.replace`` (atomic on POSIX): a
``kill -9`` at any moment leaves the old file or the new one. A folder cannot replace
another in one portable rename, so :func:`atomic_path` takes three, each leaving a
state :func:`recover` knows how to finish::

    .NAME.tmp-STAMP   being written: incomplete, removed by recover
    .NAME.new-STAMP   written and flushed: complete, the newest copy
    .NAME.old-STAMP   the previous NAME, moved aside: complete, older than any .new-

    1. .NAME.tmp-S -> .NAME.new-S     (the new copy is complete)
    2. NAME        -> .NAME.old-S     (only when NAME exists)
    3. .NAME.new-S -> NAME
    4. remove .NAME.old-S

``STAMP`` starts with the time in nanoseconds, so names sort by age. Readers take
:func:`complete_copy` (NAME, else the newest ``.new-``, else the newest ``.old-``);
:func:`recover` (called by every writer for its own NAME before writing, and by the
GPT-2 driver for its whole output folder at start) puts that copy at NAME and removes
the rest, with one log line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError, first_line

logger = logging.getLogger(__name__)

TEMPORARY, NEW, OLD = "tmp", "new", "old"
_SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<stamp>[0-9a-z_-]+)$")


def sibling(path: Path, kind: str, stamp: str) -> Path:
    """``.NAME.{kind}-{stamp}`` beside ``path``."""
    return path.parent / f".{path.name}.{kind}-{stamp}"


def leftovers(path: str | os.PathLike) -> dict[str, list[Path]]:
    """The temporary names of ``path`` beside it, by kind, oldest first."""
    path = Path(path)
    found: dict[str, list[tuple[str, Path]]] = {TEMPORARY: [], NEW: [], OLD: []}
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(path.parent):
            match = _SIBLING_RE.match(entry.name)
            if match and match["name"] == path.name:
                found[match["kind"]].append((match["stamp"], Path(entry.path)))
    return {kind: [p for _, p in sorted(entries)] for kind, entries in found.items()}


def leftover_names(directory: str | os.PathLike) -> list[str]:
    """The names in ``directory`` that have temporary copies beside them."""
    names = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(directory):
            match = _SIBLING_RE.match(entry.name)
            if match:
                names.add(match["name"])
    return sorted(names)


def complete_copy(path: str | os.PathLike) -> Path | None:
    """The newest complete copy of ``path``: ``path`` itself, else the newest
    ``.NAME.new-*`` (a write interrupted before its last rename), else the newest
    ``.NAME.old-*``; ``None`` when there is none. Changes nothing on disk."""
    path = Path(path)
    found = leftovers(path)
    if found[NEW]:
        return found[NEW][-1]
    if os.path.lexists(path):
        return path
    return found[OLD][-1] if found[OLD] else None


def recover(path: str | os.PathLike) -> Path | None:
    """Finish an interrupted write of ``path``: put its newest complete copy at
    ``path`` and remove every temporary name of it. Returns the copy moved into
    place (``None`` when ``path`` was already the newest). Logs one line when it
    changes anything. Only the owner of ``path`` (its writer) may call this."""
    path = Path(path)
    found = leftovers(path)
    if not any(found.values()):
        return None
    restored = None
    if found[NEW]:
        restored = found[NEW].pop()
        if os.path.lexists(path):
            aside = sibling(path, OLD, _new_stamp())
            os.replace(path, aside)
            found[OLD].append(aside)
        os.replace(restored, path)
    elif found[OLD] and not os.path.lexists(path):
        restored = found[OLD].pop()
        legacy = restored / "d"  # earlier versions moved NAME to .NAME.old-*/d
        if legacy.is_dir() and not legacy.is_symlink():
            os.replace(legacy, path)
            found[OLD].append(restored)
        else:
            os.replace(restored, path)
    _fsync_dir(path.parent)
    removed = [p for kind in (TEMPORARY, NEW, OLD) for p in found[kind]]
    for stale in removed:
        _remove(stale)
    if restored is not None:
        logger.warning("%s: an interrupted write left it incomplete; recovered the newest "
                       "complete copy (%s)%s", path, restored.name,
                       f" and removed {len(removed)} stale temporary copies" if removed else "")
    else:
        logger.warning("%s: removed %d temporary copies left by an interrupted write",
                       path, len(removed))
    return restored


def recover_folder(directory: str | os.PathLike) -> list[Path]:
    """:func:`recover` every entry of ``directory`` that has temporary copies; returns
    the entries that were restored from one."""
    restored = []
    for name in leftover_names(directory):
        if recover(Path(directory) / name) is not None:
            restored.append(Path(directory) / name)
    return restored


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; put it at ``path`` on success.

    With ``is_dir=True`` the temporary path is a fresh directory, and an existing
    file or folder at ``path`` is replaced in the steps of the module doc. On an
    exception the temporary file or directory is removed and ``path`` is left
    untouched. Temporary copies an earlier, interrupted write of ``path`` left are
    dealt with first (:func:`recover`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    stamp = _new_stamp()
    tmp = sibling(path, TEMPORARY, stamp)
    # Give the final file or directory the permissions an ordinary open() or mkdir() would.
    umask = _current_umask()
    if is_dir:
        os.mkdir(tmp)
        os.chmod(tmp, 0o777 & ~umask)
    else:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask))
    published = False
    try:
        yield tmp
        if is_dir:
            _fsync_tree(tmp)
            new = sibling(path, NEW, stamp)
            os.replace(tmp, new)
            published = True
            _fsync_dir(path.parent)
            if os.path.lexists(path):
                old = sibling(path, OLD, stamp)
                os.replace(path, old)
                os.replace(new, path)
                _fsync_dir(path.parent)
                _remove(old)
            else:
                os.replace(new, path)
        else:
            _fsync_file(tmp)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.lexists(tmp):
            _remove(tmp)
        if published:  # the new copy is complete: finish putting it in place
            with contextlib.suppress(OSError):
                recover(path)
        raise


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, **kwargs)


# --------------------------------------------------------------------------- #
# Output folders and files the user hands us
# --------------------------------------------------------------------------- #

def check_folder_path(path: str | os.PathLike, flag: str) -> None:
    """``path`` is a folder, or can be created as one, and can be written into;
    else one :class:`UserError` naming ``flag``. Nothing is created here."""
    probe = Path(path).expanduser().absolute()
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder; give a folder path")
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {probe} is a file, not a folder; "
                        f"give a path under a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path} cannot be written ({probe} is not writable); give a "
                        f"folder you can write to")


def make_folder(path: str | os.PathLike, flag: str) -> Path:
    """Create the folder ``path`` (and its parents); an error is one :class:`UserError`."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {flag} {path}: {exc.strerror or exc}") from None
    return folder


def load_plain_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: tensors and plain
    containers only, so a crafted pickle is refused, never run. A file that cannot
    be read raises :class:`UserError` whose message says why in a few words (the
    caller adds what the file is and the fix)."""
    import warnings

    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning precedes our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(_why_unreadable(path, exc)) from None


def _why_unreadable(path: Path, exc: Exception) -> str:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as err:
        return err.strerror or type(err).__name__
    if size == 0:
        return "the file is empty"
    # torch.save writes a zip archive; older files are a pickle (protocol 2+: 0x80).
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        return (f"it is not a file written by torch.save (neither a zip archive nor a pickle, "
                f"{size} bytes); it may be truncated or corrupt")
    text = str(exc).strip()
    if "weights only load failed" in text.lower() or "weights_only" in text:
        return ("it holds objects other than tensors and plain containers, refused for "
                "safety (weights_only=True)")
    return f"it is damaged or not a PyTorch file ({first_line(exc)})"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def _new_stamp() -> str:
    return f"{time.time_ns():020d}-{secrets.token_hex(3)}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
