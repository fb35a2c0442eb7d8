"""Atomic writes: an interrupted write leaves the previous file whole and no temporary behind."""
import json

import pytest

from hsplit_nb import io


def test_atomic_write_replaces_whole(tmp_path):
    p = tmp_path / "sub" / "r.json"
    io.atomic_write_json(p, {"a": 1})
    io.atomic_write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [x.name for x in p.parent.iterdir()] == ["r.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "r.txt"
    io.atomic_write_text(p, "old")

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        io.atomic_write_text(p, "new")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["r.txt"]
