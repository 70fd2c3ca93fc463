"""Shards written by other tools (img2dataset's webdataset output: `{key}.jpg/.txt/.json` per sample,
`{shard}_stats.json`, optional `.parquet`, no manifest.json): count the usable samples of each tar.

    vlm-dist index-shards data/cc3m                 # once: writes data/cc3m/manifest.json
    from vlm_dist.data.index import index_directory
    index = index_directory(Path("data/cc3m"))      # what the loader does in memory when there is none

A sample is usable when it has a `.jpg` and a caption: a `.json` with `captions` (non-empty strings) /
`qa` ({question, answer} pairs) (shard-coco's layout), or a non-empty UTF-8 `.txt`. `sample_problem` is the one rule: the scan counts with it and
the loader drops the same samples before cutting its epochs, so the counts every rank sizes its epoch
from are the samples it will actually read. Skipped samples are counted by reason and reported.

The scan reads tar headers (seeking past image bytes) and only the small .txt/.json members; samples
are grouped the way webdataset groups them (consecutive members with the same key).
"""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from vlm_dist.data.samples import IMAGE_MEMBERS, wanted_member

INDEX_FORMAT = "vlm-dist/indexed-shards/1"
REASONS = ("missing_image", "missing_caption", "bad_json", "bad_caption")


def sample_problem(raw: dict) -> str | None:
    """None if a raw sample (extension -> bytes, as webdataset yields it) can be trained on, else why not."""
    if not any(m in raw for m in IMAGE_MEMBERS):  # a JPEG, or a feature shard's tower tokens
        return "missing_image"
    meta = None
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            return "bad_json"
        if not isinstance(meta, dict) or not _fields_ok(meta):
            return "bad_json"
    if meta and (meta.get("captions") or meta.get("qa")):
        return None
    txt = raw.get("txt")  # img2dataset: the caption (used only when the .json has none)
    if txt is not None:
        try:
            if txt.decode("utf-8").strip():
                return None
        except UnicodeDecodeError:
            return "bad_caption"
    return "missing_caption"


def _fields_ok(meta: dict) -> bool:
    """`captions`: a list of non-empty strings; `qa`: a list of {question, answer} strings (when present)."""
    captions, qa = meta.get("captions"), meta.get("qa")
    if captions is not None and not (isinstance(captions, list)
                                     and all(isinstance(c, str) and c.strip() for c in captions)):
        return False
    return qa is None or isinstance(qa, list) and all(
        isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str) for p in qa)


def _samples(path: Path):
    """Raw samples of a tar with .txt/.json bytes and a placeholder for the image (its bytes are not read)."""
    with tarfile.open(path) as tar:  # random access: headers are read, member data is seeked over
        current: dict | None = None
        for info in tar:
            if not info.isreg() or not wanted_member(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is None:
                continue
            ext = ext.lower()
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key}
            elif ext in current:  # webdataset's grouping raises on it mid-epoch: refuse the shard now
                raise ValueError(f"{path} holds {info.name} twice (webdataset cannot read such a tar): write the "
                                 f"shard again, or remove it")
            current[ext] = b"" if ext in IMAGE_MEMBERS else tar.extractfile(info).read()
        if current is not None:
            yield current


def scan_shard(path: Path) -> dict:
    """{"name", "samples" (usable), "skipped" {reason: n}, "examples" (a few skipped keys)} of one tar."""
    skipped: Counter = Counter()
    examples: list[str] = []
    usable = 0
    try:
        for raw in _samples(path):
            problem = sample_problem(raw)
            if problem is None:
                usable += 1
            else:
                skipped[problem] += 1
                if len(examples) < 3:
                    examples.append(f"{raw['__key__']}: {problem}")
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path} is not a readable tar ({err}); remove it or write it again") from None
    return {"name": path.name, "samples": usable, "skipped": dict(sorted(skipped.items())), "examples": examples}


def _stats_successes(directory: Path, tar_name: str) -> int | None:
    """img2dataset's own count for a shard (`{shard}_stats.json` "successes"), if present."""
    stem = tar_name[: -len(".tar")]
    path = directory / f"{stem}_stats.json"
    try:
        return int(json.loads(path.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def index_directory(directory: Path, tars: list[Path] | None = None) -> dict:
    """Scan the tars of a directory (default: every *.tar in it); returns manifest-shaped counts."""
    directory = Path(directory)
    tars = sorted(tars if tars is not None else directory.glob("*.tar"))
    if not tars:
        raise ValueError(f"{directory} holds no .tar shards")
    shards, skipped, mismatches = [], Counter(), []
    for tar in tars:
        entry = scan_shard(tar)
        successes = _stats_successes(directory, tar.name)
        if successes is not None:
            entry["stats_successes"] = successes
            written = entry["samples"] + sum(entry["skipped"].values())
            if written != successes:
                mismatches.append(f"{tar.name}: {written} samples in the tar, {successes} in its _stats.json")
        shards.append(entry)
        skipped.update(entry["skipped"])
    return {"format": INDEX_FORMAT, "shards": shards,
            "totals": {"samples": sum(s["samples"] for s in shards), "skipped": sum(skipped.values()),
                       "skipped_by_reason": dict(sorted(skipped.items()))},
            "stats_mismatches": mismatches}


def format_index(index: dict) -> str:
    t = index["totals"]
    lines = [f"usable samples   {t['samples']}  in {len(index['shards'])} shard(s)",
             f"skipped          {t['skipped']} (no image or no caption)"]
    lines += [f"  {reason:<16} {n}" for reason, n in t["skipped_by_reason"].items()]
    examples = [e for s in index["shards"] for e in s["examples"]][:5]
    lines += [f"  e.g. {e}" for e in examples]
    lines += [f"warning: {m}" for m in index.get("stats_mismatches", [])]
    return "\n".join(lines)
