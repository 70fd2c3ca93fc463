"""How much of each kind of JPEG damage shard-coco's --verify levels catch, on the bench's photos.

    from benchlib.damage import damage_table
    lines = damage_table(files, per_kind=100)      # markdown table: kind x level -> rejected / tried

Kinds of damage, each applied to the kept bytes of a good 640x480 photo at a random place in its
entropy-coded (scan) data, one damaged copy per photo and kind:
  cut short        the file truncated (an interrupted download or copy: the usual damage)
  1 byte changed   one scan byte set to another value (a bit error on disk or in transfer)
  512 bytes zeroed a 512-byte block of the scan data zeroed (a lost disk sector)
Each copy goes through images.check_image at --verify full and header; "rejected" counts the copies
refused with a reason (truncated_image / corrupt_image). What `full` lets through, libjpeg decodes
with a warning into wrong pixels.
"""

from __future__ import annotations

import random
from pathlib import Path


def scan_start(raw: bytes) -> int:
    """Offset of the first byte after the first SOS segment header."""
    i = raw.index(b"\xff\xda")
    return i + 2 + int.from_bytes(raw[i + 2 : i + 4], "big")


def damaged(raw: bytes, kind: str, rng: random.Random) -> bytes:
    start, end = scan_start(raw), len(raw) - 2  # scan data: [start, end), EOI after it
    at = rng.randrange(start, end - 512)
    if kind == "cut short":
        return raw[:at]
    if kind == "1 byte changed":
        new = rng.choice([b for b in range(256) if b != raw[at]])
        return raw[:at] + bytes([new]) + raw[at + 1 :]
    if kind == "512 bytes zeroed":
        return raw[:at] + bytes(512) + raw[at + 512 :]
    raise ValueError(kind)


KINDS = ("cut short", "1 byte changed", "512 bytes zeroed")


def damage_counts(files: list[Path], per_kind: int, seed: int = 0) -> dict[str, dict[str, int]]:
    from vlm_dist.data.images import ImageReject, check_image

    rng = random.Random(seed)
    counts = {k: {"tried": 0, "full": 0, "header": 0} for k in KINDS}
    for kind in KINDS:
        for f in files[:per_kind]:
            bad = damaged(f.read_bytes(), kind, rng)
            counts[kind]["tried"] += 1
            for level in ("full", "header"):
                try:
                    check_image(bad, f.name, None, level)
                except ImageReject:
                    counts[kind][level] += 1
    return counts


def damage_table(files: list[Path], per_kind: int, seed: int = 0) -> tuple[list[str], dict]:
    counts = damage_counts(files, per_kind, seed)
    lines = ["| damage (in the scan data) | copies | rejected at --verify full | rejected at --verify header |",
             "|---|---|---|---|"]
    for kind, c in counts.items():
        lines.append(f"| {kind} | {c['tried']} | {c['full']} ({100 * c['full'] / c['tried']:.0f} %) "
                     f"| {c['header']} ({100 * c['header'] / c['tried']:.0f} %) |")
    return lines, counts
