"""COCO-sized, photo-like JPEGs and a COCO captions file for them, made on the spot (no download).

    from benchlib.photos import make_coco_like
    paths = make_coco_like(Path("/tmp/photos"), n=512, workers=2)   # {"images": dir, "ann": json, ...}

Why not flat synthetic shapes: throughput of JPEG decoding (and of anything that reads every
entropy-coded byte, such as shard-coco's check) scales with the compressed size, and a flat image
compresses to a few KiB where a COCO photo takes ~100-200 KiB at 640x480. Each image here is a smooth
random colour field (low-frequency) + mid-frequency texture + a few soft-edged ellipses and boxes +
per-pixel sensor-like noise, saved at JPEG quality 92 (4:2:0): ~134 KiB mean (COCO: ~155 KiB), printed by the scripts
(`mean_kib`) so the reader can compare with real COCO. Image i is a function of (seed, i) only.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WIDTH, HEIGHT, QUALITY = 640, 480, 92
WORDS = ("a man woman dog cat bus train plate of food sitting on the table next to street with red blue "
         "green white black large small two people riding bike down road near building in front tree").split()


def _field(rng: np.random.Generator, cells: tuple[int, int], amplitude: float) -> np.ndarray:
    """Random (H, W, 3) field of `cells` control points, bicubic-upsampled to the image size."""
    small = rng.uniform(-amplitude, amplitude, size=(*cells, 3)) + 128
    img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB").resize((WIDTH, HEIGHT), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) - 128


def photo(seed: int, index: int) -> bytes:
    """One 640x480 RGB JPEG, a deterministic function of (seed, index)."""
    rng = np.random.default_rng([seed, index])
    base = rng.uniform(60, 190, size=3)
    pixels = base + _field(rng, (4, 5), 90) + _field(rng, (30, 40), 40)  # (H, W, 3) float
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):  # objects with edges (the part JPEG spends bits on)
        x0, y0 = rng.integers(0, WIDTH - 40), rng.integers(0, HEIGHT - 40)
        box = [int(x0), int(y0), int(x0 + rng.integers(30, 260)), int(y0 + rng.integers(30, 200))]
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, size=(HEIGHT, WIDTH, 3))  # sensor-like noise
    out = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def caption(seed: int, index: int) -> str:
    rng = np.random.default_rng([seed, index, 1])
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(8, 14))))


def _write(job: tuple[Path, int, int]) -> int:
    path, seed, index = job
    data = photo(seed, index)
    path.write_bytes(data)
    return len(data)


def make_coco_like(root: Path, n: int, seed: int = 0, workers: int = 1) -> dict:
    """root/images/{id:012d}.jpg (n files) + root/captions.json (COCO captions format, 2 captions each).
    Reuses files already there (same names = same content, by determinism). Returns paths and sizes."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ids = list(range(1, n + 1))
    jobs = [(images / f"{i:012d}.jpg", seed, i) for i in ids if not (images / f"{i:012d}.jpg").is_file()]
    if jobs:
        if workers > 1 and len(jobs) > 1:
            with mp.get_context("fork").Pool(workers) as pool:
                pool.map(_write, jobs, chunksize=8)
        else:
            for job in jobs:
                _write(job)
    ann = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": WIDTH, "height": HEIGHT} for i in ids],
           "annotations": [{"id": 2 * i + k, "image_id": i, "caption": caption(seed, 2 * i + k)} for i in ids for k in (0, 1)]}
    (root / "captions.json").write_text(json.dumps(ann))
    sizes = [(images / f"{i:012d}.jpg").stat().st_size for i in ids]
    return {"images": images, "ann": root / "captions.json", "files": [images / f"{i:012d}.jpg" for i in ids],
            "n": n, "bytes": sum(sizes), "mean_kib": sum(sizes) / n / 1024}
