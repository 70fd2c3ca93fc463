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


def _commit(tmp: Path, path: Path, sync_dir: bool = True) -> None:
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


def _member_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


_TEMPLATE = _member_info("").tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
# The template's byte sum outside the name, size and checksum fields (+ 8 spaces for the checksum field).
_BASE_SUM = sum(_TEMPLATE[100:124]) + sum(_TEMPLATE[136:148]) + 8 * 32 + sum(_TEMPLATE[156:])


def member_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for one of our members (fixed owner, mode, mtime).

    Built by splicing name, size and checksum into a template (~15x faster than TarInfo.tobuf, which
    matters at 3 members per image); names tarfile would split or encode differently go through
    tarfile itself. tests/test_data_shard.py checks the bytes equal tarfile's."""
    raw = name.encode("ascii", "replace")
    if len(raw) > tarfile.LENGTH_NAME or not name.isascii() or size >= 8**11:
        info = _member_info(name)
        info.size = size
        return info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _BASE_SUM + sum(raw) + sum(size_field)  # the header's byte sum, its checksum field as spaces
    return (raw.ljust(100, tarfile.NUL) + _TEMPLATE[100:124] + size_field + _TEMPLATE[136:148]
            + b"%06o\0 " % checksum + _TEMPLATE[156:])


class TarWriter:
    """Stream members into `path` atomically: `with TarWriter(p) as w: w.add(name, data)`.

    Names must be added in strictly increasing order (what makes the bytes deterministic and keeps a
    sample's members adjacent for webdataset). The tar is committed only if the block exits cleanly.
    sync_dir=False leaves the directory's fsync (which makes the rename itself durable) to the caller,
    who writes several files and fsyncs the directory once at the end (shard-coco: with its manifest).
    """

    def __init__(self, path: Path, sync_dir: bool = True):
        self.path, self.tmp, self.sync_dir = path, temp_name(path), sync_dir
        self.last: str | None = None
        self.size = 0
        self.sha256 = ""

    def __enter__(self) -> "TarWriter":
        self._file = open(self.tmp, "wb")
        self._hash = hashlib.sha256()  # of the bytes as they are written: no second read of the tar
        return self

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def add(self, name: str, data: bytes) -> None:
        if self.last is not None and name <= self.last:
            raise ValueError(f"tar members must be added in sorted order: {name!r} after {self.last!r}")
        self.last = name
        # What tarfile.addfile writes (a 512-byte USTAR header, the data, zeros to a 512 multiple),
        # without its chunked copy through a file object; the bytes are the same (tests/test_data_shard.py).
        self._write(member_header(name, len(data)))
        self._write(data)
        if len(data) % tarfile.BLOCKSIZE:
            self._write(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:  # tarfile's end: two zero blocks, then zeros to a whole record
                end = self.size + 2 * tarfile.BLOCKSIZE
                self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end) % tarfile.RECORDSIZE))
            self._file.flush()
            if exc_type is None:
                os.fsync(self._file.fileno())
            self._file.close()
            if exc_type is None:
                self.sha256 = self._hash.hexdigest()
                _commit(self.tmp, self.path, self.sync_dir)
        finally:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Whole or absent under `path`, even if killed; durable=False skips both fsyncs (the file may be
    lost, never torn, on a power cut: for caches that are checked before use)."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        _commit(tmp, path, durable)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj, durable: bool = True) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), durable)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kept_stats(tar: Path, stats_path: Path, expect: dict) -> dict | None:
    """The stats file of a tar an earlier run finished, if its fields include `expect` (what made the tar)
    and the tar's size and SHA-256 are the recorded ones, else None (write it again): how shard-coco and
    precompute-features resume."""
    if not (tar.is_file() and stats_path.is_file()):
        return None
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(stats.get(k) != v for k, v in expect.items()) or stats.get("bytes") != tar.stat().st_size:
        return None
    return stats if file_sha256(tar) == stats.get("sha256") else None
