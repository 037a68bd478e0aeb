"""Which local paths a request may name: only those under the directories the operator allowed.

A request names data; a local path is a single-host convenience (`--allow-local-paths DIR[,DIR]`,
env LORAFLOW_ALLOW_LOCAL_PATHS). The path is resolved first (realpath: `..` and symlinks are followed)
and only then compared with the roots (also resolved), so neither can lead out of a root. Kernel and
device trees (/proc, /sys, /dev) are refused even under an allowed root such as `/`.

A refusal never says whether the path exists: the message is the same for a missing and a forbidden
path, and names the field and the path as the request gave it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import InvalidArgument, PermissionDenied

# Pseudo-filesystems whose "files" are processes' memory, environments, kernel state or devices.
FORBIDDEN_TREES = ("/proc", "/sys", "/dev")
ALLOW_FLAG = "--allow-local-paths"
ALLOW_ENV = "LORAFLOW_ALLOW_LOCAL_PATHS"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def real(path: str | os.PathLike) -> str:
    """The resolved absolute path (symlinks and `..` followed as far as the path exists)."""
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def in_forbidden_tree(resolved: str) -> bool:
    return any(_under(resolved, tree) for tree in FORBIDDEN_TREES)


@dataclass(frozen=True)
class LocalPathPolicy:
    """The allowed roots; empty = every local path refused. Roots are absolute and stored resolved."""

    roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        resolved = []
        for root in self.roots:
            if not isinstance(root, str) or not os.path.isabs(root):
                raise InvalidArgument(f"allow_local_paths entries must be absolute directories, got {root!r}",
                                      field="allow_local_paths", value=root)
            resolved.append(real(root))
        object.__setattr__(self, "roots", tuple(resolved))

    @classmethod
    def from_settings(cls, security) -> LocalPathPolicy:
        """From SecuritySettings.allow_local_paths."""
        return cls(tuple(security.allow_local_paths))

    def with_roots(self, *extra: str | os.PathLike) -> LocalPathPolicy:
        """This policy plus more roots (e.g. a file store's own directory)."""
        return LocalPathPolicy(self.roots + tuple(real(r) for r in extra))

    def allows(self, path: str | os.PathLike) -> bool:
        resolved = real(path)
        return not in_forbidden_tree(resolved) and any(_under(resolved, root) for root in self.roots)

    def check(self, path: str | os.PathLike, *, field: str, given: str | None = None) -> Path:
        """The resolved path when it lies under an allowed root; PermissionDenied otherwise.

        ``given`` is what the request said (shown in the error); defaults to ``path``.
        """
        shown = given if given is not None else os.fspath(path)
        if "\x00" in os.fspath(path):
            raise InvalidArgument(f"{field} contains a NUL byte", field=field, value=shown)
        resolved = real(path)
        if in_forbidden_tree(resolved):
            raise PermissionDenied(f"{field} {shown!r}: device, process and kernel files (/proc, /sys, /dev) are "
                                   "never read", field=field, value=shown)
        if not self.roots:
            raise PermissionDenied(f"{field} {shown!r}: this service reads no local paths; its operator can allow "
                                   f"directories with {ALLOW_FLAG} DIR[,DIR] (env {ALLOW_ENV}), or upload the data "
                                   "to the store and name its URI", field=field, value=shown)
        if not any(_under(resolved, root) for root in self.roots):
            raise PermissionDenied(f"{field} {shown!r} is not under a directory this service allows local paths "
                                   f"from ({ALLOW_FLAG} / {ALLOW_ENV})", field=field, value=shown)
        return Path(resolved)
