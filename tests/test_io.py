import os
import stat

import pytest

from scalegrad.io import atomic_path, write_json


def test_write_json_atomic_and_readable(tmp_path):
    target = tmp_path / "sub" / "result.json"
    write_json(target, {"a": 1})
    assert target.read_text() == '{"a": 1}'
    mode = stat.S_IMODE(target.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]


def test_failure_leaves_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_directory_replaced_whole(tmp_path):
    target = tmp_path / "best"
    for version in ("1", "2"):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "weights").write_text(version)
    assert (target / "weights").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# --------------------------------------------------------------------------- #
# Crash states of a folder replacement, and their recovery
# --------------------------------------------------------------------------- #

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

from scalegrad import io  # noqa: E402
from scalegrad.errors import UserError  # noqa: E402


def make_copy(path: Path, version: str) -> Path:
    path.mkdir()
    (path / "weights").write_text(version)
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


STAMP_OLD, STAMP_NEW = "00000000000000000001-aaaaaa", "00000000000000000002-bbbbbb"


@pytest.mark.parametrize("state, newest", [
    # (entries beside `best`, the version the newest complete copy holds)
    ({"best": "1", ".best.tmp-" + STAMP_NEW: "half"}, "1"),            # crash while writing
    ({"best": "1", ".best.new-" + STAMP_NEW: "2"}, "2"),               # after step 1
    ({".best.old-" + STAMP_NEW: "1", ".best.new-" + STAMP_NEW: "2"}, "2"),  # after step 2
    ({"best": "2", ".best.old-" + STAMP_NEW: "1"}, "2"),               # after step 3
    ({".best.old-" + STAMP_OLD: "1"}, "1"),                            # only an older copy
    ({"best": "2", ".best.new-" + STAMP_OLD: "1", ".best.new-" + STAMP_NEW: "3"}, "3"),
])
def test_complete_copy_and_recover_find_the_newest_complete_copy(tmp_path, caplog, state, newest):
    for name, version in state.items():
        make_copy(tmp_path / name, version)
    before = names(tmp_path)
    found = io.complete_copy(tmp_path / "best")
    assert (found / "weights").read_text() == newest
    assert names(tmp_path) == before  # reading changes nothing
    with caplog.at_level(logging.WARNING, logger="scalegrad.io"):
        io.recover(tmp_path / "best")
    assert names(tmp_path) == ["best"]
    assert (tmp_path / "best" / "weights").read_text() == newest
    assert len(caplog.records) == 1 and "interrupted write" in caplog.records[0].getMessage()
    caplog.clear()
    assert io.recover(tmp_path / "best") is None and not caplog.records  # nothing left to do


def test_recover_takes_the_layout_of_earlier_versions(tmp_path):
    """Earlier versions moved the old folder to .NAME.old-XXXX/d (mkdtemp names)."""
    make_copy(tmp_path / ".resume.old-k2j_x9q", "0")
    (tmp_path / ".resume.old-k2j_x9q" / "weights").rename(tmp_path / "w")
    make_copy(tmp_path / ".resume.old-k2j_x9q" / "d", "1")
    make_copy(tmp_path / ".resume.tmp-abc123", "?")
    io.recover_folder(tmp_path)
    assert names(tmp_path) == ["resume", "w"]
    assert (tmp_path / "resume" / "weights").read_text() == "1"


def test_atomic_path_finishes_an_interrupted_write_of_its_name_first(tmp_path):
    make_copy(tmp_path / f".best.new-{STAMP_OLD}", "2")
    (tmp_path / f".other.tmp-{STAMP_OLD}").write_text("not ours")
    (tmp_path / f".result.json.tmp-{STAMP_OLD}").write_text('{"ha')
    with io.atomic_path(tmp_path / "best", is_dir=True) as tmp:
        assert names(tmp_path) == sorted([".other.tmp-" + STAMP_OLD, ".result.json.tmp-" + STAMP_OLD,
                                          "best", tmp.name])
        (tmp / "weights").write_text("3")
    io.write_json(tmp_path / "result.json", {"a": 1})
    assert names(tmp_path) == [".other.tmp-" + STAMP_OLD, "best", "result.json"]
    assert (tmp_path / "best" / "weights").read_text() == "3"


def test_a_failing_swap_puts_the_complete_new_copy_in_place(tmp_path, monkeypatch):
    make_copy(tmp_path / "best", "1")
    real_replace, calls = os.replace, []

    def replace_interrupted_at_the_third_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_interrupted_at_the_third_rename)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(tmp_path / "best", is_dir=True) as tmp:
            (tmp / "weights").write_text("2")
    assert [c[1].split("-")[0] for c in calls[:3]] == [".best.new", ".best.old", "best"]
    assert names(tmp_path) == ["best"] and (tmp_path / "best" / "weights").read_text() == "2"


# --------------------------------------------------------------------------- #
# Output folders and torch files a user hands us
# --------------------------------------------------------------------------- #

def test_check_folder_path_and_make_folder(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    io.check_folder_path(tmp_path / "new" / "deeper", "--out")
    with pytest.raises(UserError, match="--out .*a_file is a file, not a folder"):
        io.check_folder_path(a_file, "--out")
    with pytest.raises(UserError, match="cannot be created: .*a_file is a file, not a folder"):
        io.check_folder_path(a_file / "sub", "--out")
    with pytest.raises(UserError, match="cannot create --out"):
        io.make_folder(a_file / "sub", "--out")
    assert not (tmp_path / "new").exists() and a_file.read_text() == "x"


def test_load_plain_torch_file_says_what_is_wrong(tmp_path):
    import torch

    good = tmp_path / "good.pt"
    torch.save({"a": torch.arange(3)}, good)
    assert torch.equal(io.load_plain_torch_file(good)["a"], torch.arange(3))
    cases = {"garbage.pt": b"not a checkpoint at all", "empty.pt": b"",
             "truncated.pt": good.read_bytes()[:200]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match="not a file written by torch.save .*truncated or corrupt"):
        io.load_plain_torch_file(tmp_path / "garbage.pt")
    with pytest.raises(UserError, match="the file is empty"):
        io.load_plain_torch_file(tmp_path / "empty.pt")
    with pytest.raises(UserError, match="truncated or corrupt"):
        io.load_plain_torch_file(tmp_path / "truncated.pt")
    torch.save({"object": UserError("x")}, tmp_path / "object.pt")
    with pytest.raises(UserError, match="refused for safety"):
        io.load_plain_torch_file(tmp_path / "object.pt")
