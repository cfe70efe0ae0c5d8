"""Atomic writes: complete files only, with the mode a plain open() would give."""

from __future__ import annotations

import os
import stat

from kn_steer.fileio import atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_uses_the_usual_mode(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old\n")
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left behind
