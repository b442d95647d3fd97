"""io_utils.write_atomic: text and bytes, no temporary left behind, the old file kept on failure."""

from __future__ import annotations

import os

import pytest

from frcnn_jax import io_utils


def test_write_atomic_text_bytes_and_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    assert io_utils.write_atomic(path, "héllo\n") == path and path.read_text(encoding="utf-8") == "héllo\n"
    io_utils.write_atomic(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        io_utils.write_atomic(path, "new")
    assert path.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert io_utils.temporary_name(path).name.startswith(".a.json.tmp")
