"""Bounded reads of regular files, and directory trees that cannot point outside themselves.

* ``read_regular_file`` opens without blocking (a FIFO never hangs the open), refuses anything that is
  not a regular file (devices, FIFOs, sockets, /proc files) and reads at most ``limit`` bytes.
* ``check_tree`` walks a directory about to be read or copied (a model, an adapter): a symlink is
  followed only when it is a file link whose target resolves inside the directory (so a published
  directory of links into its own files still works); a link that leads outside, a link to a directory,
  and any non-regular file are refused, naming the file.

Errors name the field, the path and what was wrong; they never carry bytes of the file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from loraflow.errors import InvalidArgument
from loraflow.security.local_paths import in_forbidden_tree, real

MAX_CONFIG_BYTES = 1 << 20  # config.json, adapter_config.json, generation_config.json, tokenizer configs
MAX_TREE_ENTRIES = 10_000  # a model or adapter directory holds tens of files, not a home directory's worth


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: str | os.PathLike, *, field: str, limit: int, shown: str | None = None) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; InvalidArgument naming field and path otherwise."""
    shown = shown if shown is not None else os.fspath(path)
    if in_forbidden_tree(real(path)):
        raise InvalidArgument(f"{field} {shown!r} is a device, process or kernel file; only regular files are read",
                              field=field, value=shown)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidArgument(f"{field} {shown!r} does not exist", field=field, value=shown) from None
    except IsADirectoryError:
        raise InvalidArgument(f"{field} {shown!r} is a directory, not a file", field=field, value=shown) from None
    except OSError as exc:
        reason = "cannot be opened" if exc.errno != errno.EACCES else "is not readable by this service"
        raise InvalidArgument(f"{field} {shown!r} {reason}", field=field, value=shown) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{field} {shown!r} is {_kind(st.st_mode)}; only regular files are read",
                                  field=field, value=shown)
        if st.st_size > limit:
            raise InvalidArgument(f"{field} {shown!r} is {st.st_size} bytes, more than the {limit}-byte limit",
                                  field=field, value=shown)
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while we read
            raise InvalidArgument(f"{field} {shown!r} is more than the {limit}-byte limit", field=field, value=shown)
        return b"".join(chunks)
    except OSError:
        raise InvalidArgument(f"{field} {shown!r} cannot be read", field=field, value=shown) from None
    finally:
        os.close(fd)


def confined_file(root: str | os.PathLike, rel: str, *, field: str) -> Path:
    """``root/rel`` when it is a regular file whose resolved path stays inside ``root``."""
    root_real = real(root)
    path = Path(root) / rel
    target = real(path)
    if not (target == root_real or target.startswith(root_real.rstrip("/") + "/")):
        raise InvalidArgument(f"{field}: {str(path)!r} is a symlink to outside {str(root)!r}; files are only "
                              "read from inside the directory", field=field, value=str(path))
    try:
        mode = os.stat(target).st_mode
    except OSError:
        raise InvalidArgument(f"{field}: {str(path)!r} does not exist", field=field, value=str(path)) from None
    if not stat.S_ISREG(mode):
        raise InvalidArgument(f"{field}: {str(path)!r} is {_kind(mode)}; only regular files are read",
                              field=field, value=str(path))
    return path


def check_tree(root: str | os.PathLike, *, field: str, max_entries: int = MAX_TREE_ENTRIES,
               max_folders: int | None = None) -> list[str]:
    """Relative POSIX paths of every file under ``root`` (sorted), after refusing escaping symlinks,
    directory links and non-regular files (see the module docstring); at most ``max_entries`` files and
    ``max_folders`` (default ``max_entries``) folders."""
    max_folders = max_entries if max_folders is None else max_folders
    root = Path(root)
    root_real = real(root)
    if not os.path.isdir(root_real):
        raise InvalidArgument(f"{field} {str(root)!r} is not a directory", field=field, value=str(root))
    files: list[str] = []
    folders = 0  # bounded on their own: files are what max_entries counts
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in list(dirnames):
            path = Path(dirpath) / name
            if path.is_symlink():
                raise InvalidArgument(f"{field}: {str(path)!r} is a symlink to a directory; directories are "
                                      "copied only as real directories", field=field, value=str(path))
        folders += len(dirnames)
        if folders > max_folders:
            raise InvalidArgument(f"{field} {str(root)!r} holds more than {max_folders} folders; it is not a "
                                  "model or adapter directory", field=field, value=str(root))
        for name in filenames:
            if len(files) >= max_entries:
                raise InvalidArgument(f"{field} {str(root)!r} holds more than {max_entries} files; it is not a "
                                      "model or adapter directory", field=field, value=str(root))
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            confined_file(root, rel, field=field)
            files.append(rel)
    return sorted(files)
