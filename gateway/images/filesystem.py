"""A directory every worker on a host (or every replica, on a shared volume) reads.

Each image is one file, named as gateway.images.base says (its expiry leads the
name), written to a temporary name in the same directory and renamed into
place, so a reader sees the whole image or nothing. There is no index to keep
consistent between processes; a file deleted by another process's sweep while
it is being read still reads whole. The background sweep (gateway.images.base) deletes expired
files and then the oldest ones until the directory is under `max_bytes`;
several processes sweeping at once only race to delete the same files, which
is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.images.base import BLOBS, ImageStore, StoredImage, StoredRef, expiry_of, media_type_of, new_name, valid_blob_name, valid_name

TMP_PREFIX = ".tmp-"
KEY_FILE = ".signing-key"
STALE_TMP_S = 600  # a temporary file this old was left by a process that died mid-write


class FilesystemImageStore(ImageStore):
    kind = "filesystem"

    def __init__(self, root: str | Path, **kw: Any) -> None:
        super().__init__(**kw)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs = self.root / BLOBS  # blobs apart, so the image sweep's scan of root never counts them

    async def put(self, data: bytes, content_type: str, *, keep_s: int | None = None) -> StoredRef:
        expires = self.expiry(keep_s)
        name = new_name(content_type, expires)
        await asyncio.to_thread(self._write, name, data)
        self._wrote(len(data))
        return StoredRef(name, expires)

    async def get(self, name: str) -> StoredImage | None:
        if not valid_name(name) or self.expired(expiry_of(name)):
            return None
        return await asyncio.to_thread(self._read, name)

    async def put_blob(self, name: str, data: bytes) -> None:
        self._check_blob(name)
        await asyncio.to_thread(self._write, name, data, self.blobs)
        self._wrote(0)  # a chance to sweep expired blobs; they take no room under the image cap

    async def get_blob(self, name: str) -> bytes | None:
        if not valid_blob_name(name) or self.expired(expiry_of(name)):
            return None
        try:
            return await asyncio.to_thread((self.blobs / name).read_bytes)
        except FileNotFoundError:
            return None

    async def delete_blob(self, name: str) -> None:
        if valid_blob_name(name):
            await asyncio.to_thread(_unlink, str(self.blobs / name))

    async def sweep(self) -> int:
        return await asyncio.to_thread(self._sweep) + await asyncio.to_thread(self._sweep_blobs)

    def _sweep_blobs(self) -> int:
        """Expired blobs and stale temporary files in the blob directory."""
        removed = 0
        try:
            entries = list(os.scandir(self.blobs))
        except FileNotFoundError:
            return 0
        now = self.clock()
        for entry in entries:
            if entry.name.startswith(TMP_PREFIX):
                try:
                    if time.time() - entry.stat().st_mtime > STALE_TMP_S:
                        removed += _unlink(entry.path)
                except FileNotFoundError:
                    pass
            elif valid_blob_name(entry.name) and expiry_of(entry.name) < now:
                removed += _unlink(entry.path)
        return removed

    def _write(self, name: str, data: bytes, where: Path | None = None) -> None:
        where = where or self.root
        where.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=where)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, where / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _read(self, name: str) -> StoredImage | None:
        try:
            data = (self.root / name).read_bytes()
        except FileNotFoundError:
            return None
        return StoredImage(data, media_type_of(name), expiry_of(name))

    def _sweep(self) -> int:
        now = self.clock()
        live: list[tuple[int, int, int, str]] = []  # expiry, write time, size, name: oldest first
        removed = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith(TMP_PREFIX):
                    if time.time() - st.st_mtime > STALE_TMP_S:  # wall clock, as the file system's
                        removed += _unlink(entry.path)
                    continue
                if not valid_name(entry.name):
                    continue
                expires = expiry_of(entry.name)
                if expires < now:
                    removed += _unlink(entry.path)
                else:
                    live.append((expires, st.st_mtime_ns, st.st_size, entry.name))
        live.sort()
        total = sum(size for _, _, size, _ in live)
        for _, _, size, name in live[:-1]:  # the newest image always stays
            if total <= self.max_bytes:
                break
            removed += _unlink(str(self.root / name))
            total -= size
        return removed


def _unlink(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return 1


def shared_signing_key(root: str | Path) -> bytes:
    """The signing key kept in the store's directory, made once by whichever process is first.

    Written to a temporary file and hard-linked into place, so a process that
    loses the race reads the winner's whole key, never an empty file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / KEY_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=root)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    key = path.read_text().strip()
    if len(key) < 32:
        raise ValueError(f"{path} holds no usable signing key; delete it or set KLEIN_URL_SIGNING_KEY")
    return key.encode()
