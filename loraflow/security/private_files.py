"""Files only their owner may read: tokens, passwords, the embedded Redis config."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` as a 0600 file, replacing it whole.

    Created 0600 from the start (never briefly world-readable, whatever the umask) and renamed into
    place, so no reader ever sees half a file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path
