"""Atomic file output: write to a temp file beside the target, then rename.

Why: a crash, a failed verification or Ctrl-C must never leave a half-written model, mask or
report where the user expects a finished one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``target`` on success.

    On any exception the temporary file (and an ONNX external-data sidecar written next to it)
    is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=str(target.parent)
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes it 0600: give it the mode an ordinary write would
            os.chmod(tmp_path, _file_mode(target))
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _file_mode(target: Path) -> int:
    """The mode ``target`` has, or the one a plain ``open(target, "w")`` would give it (0666 less
    the umask): a model written for a service account to read must not end up owner-only."""
    if target.is_file():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
