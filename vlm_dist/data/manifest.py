"""Find shards and their sample counts (from the manifest.json that `vlm-dist shard-coco` writes).

    from vlm_dist.data.manifest import resolve_shards
    shards = resolve_shards("data/shards/train")                        # a directory with manifest.json
    shards = resolve_shards("data/shards/train/train-{00000..00003}.tar")  # or a brace pattern / glob

The loader sizes every epoch from these counts before reading a byte of the tars, which is what
lets all ranks agree on the number of batches up front.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import braceexpand

MANIFEST = "manifest.json"
HOW_TO = ("write shards with `vlm-dist shard-coco --images DIR --ann FILE --out DIR` "
          "(or `vlm-dist demo-data` for the synthetic set), which also writes manifest.json")


class ShardSpecError(ValueError):
    """The shard specification names no usable shards; the message says what to do."""


@dataclass(frozen=True)
class Shard:
    url: str  # a local file path
    samples: int


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise ShardSpecError(f"no {MANIFEST} in {directory}: the loader needs per-shard sample counts; {HOW_TO}")
    try:
        manifest = json.loads(path.read_text())
        counts = {s["name"]: int(s["samples"]) for s in manifest["shards"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ShardSpecError(f"{path} is damaged ({err}); rerun shard-coco to rewrite it") from None
    return {"counts": counts, "split": manifest.get("split"), "path": str(path)}


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
    if Path(spec).is_dir():
        directory = Path(spec)
        counts = read_manifest(directory)["counts"]
        urls = [str(directory / name) for name in counts]
    else:
        urls = _expand(spec)
        if not urls or not any(Path(u).is_file() for u in urls):
            raise ShardSpecError(f"shard pattern {spec!r} matches no files; check the path, or {HOW_TO}")
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardSpecError(f"{len(missing)} shard(s) of {spec!r} are missing, e.g. {missing[0]}; "
                             f"rerun shard-coco to complete them")
    manifests: dict[Path, dict] = {}
    shards = []
    for url in sorted(set(urls)):
        directory = Path(url).parent
        if directory not in manifests:
            manifests[directory] = read_manifest(directory)["counts"]
        name = Path(url).name
        if name not in manifests[directory]:
            raise ShardSpecError(f"{url} is not listed in {directory / MANIFEST}; rerun shard-coco on that directory")
        if manifests[directory][name] > 0:
            shards.append(Shard(url, manifests[directory][name]))
    if not shards:
        raise ShardSpecError(f"the shards of {spec!r} hold no samples (manifest counts are all 0)")
    return shards
