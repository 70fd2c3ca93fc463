"""Deterministic, crash-safe file writing for shards.

    from vlm_dist.data.tario import TarWriter
    with TarWriter(Path("out/train-00000.tar")) as w:   # members in sorted order
        w.add("000000000001.jpg", jpeg_bytes); w.add("000000000001.json", meta_bytes)

A tar's bytes depend only on its members: names sorted, mtime/uid/gid fixed at 0, empty user/group
names, mode 0644, USTAR headers. A file appears under its final name only when complete: it is
written to a hidden temp name in the same directory, fsync'ed, then os.replace'd (atomic on POSIX),
and the directory is fsync'ed, so a killed run leaves at most a `.NAME.tmp-PID` file, never a
truncated tar under a shard's name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_temp(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class TarWriter:
    """Stream members into `path` atomically: `with TarWriter(p) as w: w.add(name, data)`.

    Names must be added in strictly increasing order (what makes the bytes deterministic and keeps a
    sample's members adjacent for webdataset). The tar is committed only if the block exits cleanly.
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, temp_name(path)
        self.last: str | None = None
        self.size = 0
        self.sha256 = ""

    def __enter__(self) -> "TarWriter":
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, name: str, data: bytes) -> None:
        if self.last is not None and name <= self.last:
            raise ValueError(f"tar members must be added in sorted order: {name!r} after {self.last!r}")
        self.last = name
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                self.size, self.sha256 = self.tmp.stat().st_size, file_sha256(self.tmp)
                _commit(self.tmp, self.path)
        finally:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
