"""Start-up cost of training on shards without manifest.json: `index_directory` (tar headers + the small
.txt/.json members) against reading every sample through webdataset, on img2dataset-layout shards of
noise JPEGs (incompressible, ~COCO-sized bytes per image after --resize 224).

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_index.py --shards 4 --per-shard 500 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vlm_dist.data.index import index_directory
from vlm_dist.data.samples import wanted_member


def write_shards(out: Path, n_shards: int, per_shard: int, side: int) -> int:
    rng = np.random.default_rng(0)
    total = 0
    for s in range(n_shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
                for ext, data in [("jpg", buf.getvalue()), ("json", json.dumps({"key": key}).encode()),
                                  ("txt", f"caption {key}".encode())]:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                total += 1
    return total


def full_read(directory: Path) -> int:
    urls = [{"url": str(p)} for p in sorted(directory.glob("*.tar"))]
    return sum(1 for _ in wds.tarfile_samples(urls, select_files=wanted_member))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--side", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        n = write_shards(d, a.shards, a.per_shard, a.side)
        size = sum(f.stat().st_size for f in d.glob("*.tar"))
        full_read(d)  # warm the page cache for both
        t_index, t_full = [], []
        for _ in range(a.repeats):  # interleaved, so both see the same machine load
            t = time.perf_counter()
            assert index_directory(d)["totals"]["samples"] == n
            t_index.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert full_read(d) == n
            t_full.append(time.perf_counter() - t)
        mi, mf = statistics.median(t_index), statistics.median(t_full)
        print(json.dumps({"samples": n, "bytes": size, "index_s": round(mi, 4), "full_read_s": round(mf, 4),
                          "index_samples_per_s": round(n / mi), "full_read_samples_per_s": round(n / mf),
                          "full_read_over_index": round(mf / mi, 2)}))


if __name__ == "__main__":
    main()
