"""blockprune.io.atomic_path: output appears whole or not at all, with the mode a plain write gives.
What can fail: the temp file's owner-only mode (mkstemp: 0600) carried onto every model, mask and
report, so a service account cannot read what the toolchain wrote; a failed write leaving a file."""

import os

import pytest

from blockprune.io import atomic_path


def test_written_files_get_the_mode_of_an_ordinary_write_and_keep_an_existing_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        target = tmp_path / "model.onnx"
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new")
        assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
        os.chmod(target, 0o640)
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"again")
        assert target.read_bytes() == b"again" and target.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "half.onnx") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("verification failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
