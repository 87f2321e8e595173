"""A registry in a local (or network-mounted) directory.

    backend = LocalBackend(Path("/srv/flashio-registry"))
    backend.put_bytes("models/opt/aliases/prod", b'{"version": "1"}')

Every write goes to a temporary file in the destination directory, is fsynced, then renamed into
place (or hard-linked, for create-if-absent, which fails atomically when the name exists), so
readers never see a partial object.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from flashio.errors import RegistryError
from flashio.registry.backend import MAX_DOCUMENT_BYTES, Backend, ObjectInfo, Source
from flashio.registry.errors import NotFoundError, TransferError

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_PIECE_BYTES = 1024 * 1024


class LocalBackend(Backend):
    """Objects are files under `root`; keys are their '/'-separated relative paths."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().absolute()
        self.description = str(self.root)

    # -- paths -----------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or key.startswith("/") or any(p in ("..", ".") for p in parts):
            raise RegistryError(f"internal error: invalid registry key {key!r}")
        return self.root.joinpath(*parts)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise NotFoundError(
                f"no registry at {self.root}: the directory does not exist; check --registry "
                f"(publishing to it creates it)"
            )

    def _tmp_for(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.parent / f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"

    # -- Backend ---------------------------------------------------------------------------
    def head(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key=key, size_bytes=st.st_size, modified_s=st.st_mtime)

    def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_DOCUMENT_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        if len(data) > MAX_DOCUMENT_BYTES:
            raise RegistryError(f"{path} is larger than {MAX_DOCUMENT_BYTES} bytes: not a registry document")
        return data

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, path)
        except OSError as exc:
            raise TransferError(f"cannot write {path}: {exc}; check the registry directory's permissions and free space") from exc
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def upload(self, key: str, source: Source, size_bytes: int, progress: Callable[[int], None] | None = None) -> None:
        path = self._path(key)
        tmp = self._tmp_for(path)
        try:
            with open(tmp, "wb") as f:
                while piece := source.read(_PIECE_BYTES):
                    f.write(piece)
                    if progress:
                        progress(len(piece))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise TransferError(f"cannot write {path}: {exc}; check the registry directory's permissions and free space") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def read_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        path = self._path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, the generator may be abandoned
        except FileNotFoundError as exc:
            raise NotFoundError(f"{path} disappeared from the registry during the pull; pull again") from exc
        with f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                piece = f.read(min(remaining, _PIECE_BYTES))
                if not piece:
                    raise TransferError(f"{path} ended at byte {end - remaining}, expected {end} bytes")
                remaining -= len(piece)
                yield piece

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._require_root()
        base_key = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self._path(base_key) if base_key else self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):  # deleted while we walk
                    st = os.stat(os.path.join(dirpath, name))
                    yield ObjectInfo(key=key, size_bytes=st.st_size, modified_s=st.st_mtime)

    def delete(self, key: str) -> None:
        # Empty directories are left in place: removing one could race a writer creating a file in it.
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise TransferError(f"cannot delete {self._path(key)}: {exc}") from exc
