"""Find shards and their sample counts (from the manifest.json that `vlm-dist shard-coco` or
`vlm-dist index-shards` writes, or from a scan of the tars when a directory has none).

    from vlm_dist.data.manifest import resolve_shards
    shards = resolve_shards("data/shards/train")                        # a directory with manifest.json
    shards = resolve_shards("data/shards/train/train-{00000..00003}.tar")  # or a brace pattern / glob
    shards = resolve_shards("data/cc3m")                                # img2dataset output: scanned

The loader sizes every epoch from these counts before it reads a sample, which is what lets all
ranks agree on the number of batches up front. Counts are of usable samples (image + caption, see
vlm_dist/data/index.py); the skipped ones are counted per shard.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand

MANIFEST = "manifest.json"
HOW_TO = ("write shards with `vlm-dist shard-coco --images DIR --ann FILE --out DIR` "
          "(or `vlm-dist demo-data` for the synthetic set), or index webdataset shards you already have "
          "(img2dataset's {key}.jpg/.txt/.json layout) with `vlm-dist index-shards DIR`")


class ShardSpecError(ValueError):
    """The shard specification names no usable shards; the message says what to do."""


@dataclass(frozen=True)
class Shard:
    url: str  # a local file path
    samples: int  # usable samples: what the loader will yield from it
    skipped: int = 0  # samples without an image or a caption, dropped by the loader
    scanned: bool = False  # counted by scanning the tar at start-up (its directory has no manifest.json)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise ShardSpecError(f"no {MANIFEST} in {directory}: the loader needs per-shard sample counts; {HOW_TO}")
    try:
        manifest = json.loads(path.read_text())
        counts = {s["name"]: int(s["samples"]) for s in manifest["shards"]}
        skipped = {s["name"]: sum(s.get("skipped", {}).values()) for s in manifest["shards"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ShardSpecError(f"{path} is damaged ({err}); rerun shard-coco (or index-shards) to rewrite it") from None
    return {"counts": counts, "skipped": skipped, "split": manifest.get("split"), "path": str(path), "scanned": False}


def directory_counts(directory: Path, names: list[str] | None = None) -> dict:
    """Counts from the directory's manifest.json, or, without one, from scanning its tars (all of them,
    or `names`): img2dataset and other webdataset writers leave no manifest."""
    if (directory / MANIFEST).is_file():
        return read_manifest(directory)
    from vlm_dist.data.index import index_directory

    tars = None if names is None else [directory / n for n in names]
    try:
        index = index_directory(directory, tars)
    except ValueError as err:
        raise ShardSpecError(f"no {MANIFEST} in {directory} and {err}; {HOW_TO}") from None
    return {"counts": {s["name"]: s["samples"] for s in index["shards"]},
            "skipped": {s["name"]: sum(s["skipped"].values()) for s in index["shards"]},
            "split": None, "path": None, "scanned": True}


def _expand(spec: str) -> list[str]:
    urls: list[str] = []
    for part in braceexpand.braceexpand(spec):
        urls += sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    return urls


def resolve_shards(spec: str | Path | None) -> list[Shard]:
    """Shards (sorted by path, empty ones dropped) with counts from each directory's manifest."""
    if spec is None or not str(spec).strip():
        raise ShardSpecError(f"no shards given: set data.train_shards / data.val_shards; {HOW_TO}")
    spec = str(spec)
    found: dict[Path, dict] = {}
    if Path(spec).is_dir():
        directory = Path(spec)
        found[directory] = directory_counts(directory)  # without a manifest: one scan of its tars, reused below
        urls = [str(directory / name) for name in found[directory]["counts"]]
    else:
        urls = _expand(spec)
        if not urls or not any(Path(u).is_file() for u in urls):
            raise ShardSpecError(f"shard pattern {spec!r} matches no files; check the path, or {HOW_TO}")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardSpecError(f"{len(missing)} shard(s) of {spec!r} are missing, e.g. {missing[0]}; "
                             f"rerun shard-coco to complete them")
    by_dir: dict[Path, list[str]] = {}
    for url in sorted(set(urls)):
        by_dir.setdefault(Path(url).parent, []).append(Path(url).name)
    found.update({d: directory_counts(d, names) for d, names in by_dir.items() if d not in found})
    shards = []
    for url in sorted(set(urls)):
        directory, name = Path(url).parent, Path(url).name
        counts = found[directory]
        if name not in counts["counts"]:
            raise ShardSpecError(f"{url} is not listed in {directory / MANIFEST}; rerun shard-coco (or "
                                 f"`vlm-dist index-shards {directory}`) on that directory")
        if counts["counts"][name] > 0:
            shards.append(Shard(url, counts["counts"][name], counts["skipped"].get(name, 0), counts["scanned"]))
    if not shards:
        raise ShardSpecError(f"the shards of {spec!r} hold no usable samples (image + caption); "
                             f"`vlm-dist index-shards DIR` shows what was skipped and why")
    return shards
