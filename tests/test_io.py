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
