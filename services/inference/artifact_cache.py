"""Local cache of compiled artifacts: fetch from the store once, verify every file, refetch when corrupt.

Layout: ``<cache_dir>/artifacts/<artifact_id>/``. A cached directory is reused when every file the
artifact manifest lists has its recorded size and sha256; otherwise it is fetched again once, and a
second mismatch fails the load with an IntegrityError naming the file.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from loraflow.artifact.manifest import Manifest, file_sha256
from loraflow.errors import FailedPrecondition, IntegrityError, InvalidArgument
from loraflow.options.names import validate_name
from loraflow.storage.store import ObjectStore, artifact_key


def verify_artifact_dir(path: Path) -> Manifest:
    """Load the manifest and check every listed file; IntegrityError names the first bad one."""
    try:
        manifest = Manifest.load(path)
    except InvalidArgument as err:
        raise IntegrityError(f"artifact at {path} has no usable manifest: {err}",
                             metadata={"path": str(path)}) from err
    for entry in manifest.files:
        file = path / entry.path
        if not file.is_file():
            raise IntegrityError(f"artifact file {entry.path} is missing from {path}",
                                 metadata={"path": str(file)})
        size = file.stat().st_size
        if size != entry.size:
            raise IntegrityError(f"artifact file {entry.path}: expected {entry.size} bytes, found {size}",
                                 metadata={"path": str(file)})
        digest = file_sha256(file)
        if digest != entry.sha256:
            raise IntegrityError(f"artifact file {entry.path}: expected sha256 {entry.sha256}, found {digest}",
                                 metadata={"path": str(file)})
    return manifest


class ArtifactCache:
    """fetch(artifact_id, artifact_uri) -> (local dir, verified manifest)."""

    def __init__(self, cache_dir: str | Path, store: ObjectStore):
        self.root = Path(cache_dir) / "artifacts"
        self.store = store
        self._lock = threading.Lock()
        self.fetches = 0  # downloads done (a warm hit does none)

    def path(self, artifact_id: str) -> Path:
        return self.root / validate_name("artifact_id", artifact_id)

    def fetch(self, artifact_id: str, artifact_uri: str) -> tuple[Path, Manifest]:
        dest = self.path(artifact_id)
        with self._lock:
            if dest.is_dir():
                try:
                    return dest, self._check(dest, artifact_id)
                except IntegrityError:
                    shutil.rmtree(dest, ignore_errors=True)  # corrupt: fetch again below
            # Redis is not trusted to say what to read: only this store's artifacts/<artifact_id>.
            key = self.store.key_of(artifact_uri)
            if key != artifact_key(artifact_id):
                raise FailedPrecondition(f"artifact {artifact_id} is recorded at a location other than this "
                                         f"store's {artifact_key(artifact_id)}; refusing to read it",
                                         field="artifact_id", value=artifact_id)
            store = self.store
            for attempt in (1, 2):
                self.fetches += 1
                try:
                    store.fetch_dir(key, dest)
                    return dest, self._check(dest, artifact_id)
                except IntegrityError:
                    shutil.rmtree(dest, ignore_errors=True)
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    @staticmethod
    def _check(path: Path, artifact_id: str) -> Manifest:
        manifest = verify_artifact_dir(path)
        if manifest.artifact_id != artifact_id:
            raise IntegrityError(f"artifact at {path} says it is {manifest.artifact_id}, expected {artifact_id}",
                                 metadata={"path": str(path)})
        return manifest
