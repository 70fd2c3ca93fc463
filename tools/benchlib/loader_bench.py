"""The streaming loader's images/s on shards of COCO-sized photos, for tools/bench_gpu.py and bench_data.py.

    shards = make_photo_shards(Path("/tmp/b"), n=2048, workers=16)     # photos.py + shard-coco
    row = loader_throughput(cfg, shards, workers=8, micro=64)          # {"images_s", "steady_images_s", ...}

The loader is the trainer's own (vlm_dist.data.loader.build_loader: webdataset tar reading, shuffle
buffer, draft-mode JPEG decode + open_clip's eval transform, tokenisation, targets, collation) for
rank 0 of a world of one, one epoch; the batches' uint8 images are normalised to the model's float
input in this process, as the trainer does on its device (on the CPU here, so the figure includes it). Reported: images/s over the whole epoch from the first
`iter()` (worker start-up and the shuffle buffer's fill included), and steady images/s from the
first batch to the last (what a long run sees).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchlib.photos import make_coco_like


def make_photo_shards(root: Path, n: int, workers: int = 1, shard_size: int = 64, seed: int = 0,
                      resize: int | None = None) -> dict:
    """n photos under root/photos, sharded by shard-coco into root/shards (reused when already there);
    with resize, also into root/shards_resized by `shard-coco --resize` ("shards_resized" in the result)."""
    from vlm_dist.data.shard import shard_coco

    photos = make_coco_like(root / "photos", n, seed=seed, workers=workers)
    out = {"shards": root / "shards"}
    if resize:
        out["shards_resized"] = root / "shards_resized"
    for key, path in out.items():
        shard_coco(photos["images"], [photos["ann"]], path, split="train", shard_size=shard_size,
                   resize=resize if key == "shards_resized" else None, workers=workers, progress=False, log=lambda m: None)
    return {**photos, **out}


def loader_throughput(cfg, shards: Path, workers: int, micro: int, max_batches: int | None = None) -> dict:
    from vlm_dist.data.loader import build_loader

    from vlm_dist.data.samples import is_pixels, normalize_images

    loader = build_loader(cfg, str(shards), rank=0, world_size=1, micro_batch=micro, train=True, num_workers=workers)
    loader.set_epoch(0)
    size = cfg.model.vision.geometry["image_size"]
    t0 = time.perf_counter()
    first = last = None
    batches = 0
    for batch in loader:
        now = time.perf_counter()
        first = now if first is None else first
        last = now
        batches += 1
        assert batch["images"].shape[0] == micro
        if is_pixels(batch["images"]):  # the model's float input, as the trainer makes it (on the CPU here)
            assert normalize_images(batch["images"], size).dtype == torch.float32
        if max_batches and batches >= max_batches:
            break
    images = batches * micro
    steady = (batches - 1) * micro / (last - first) if batches > 1 and last > first else None
    return {"workers": workers, "micro": micro, "batches": batches, "images": images,
            "seconds": last - t0, "images_s": images / (last - t0), "steady_images_s": steady,
            "first_batch_s": first - t0}
