"""How far the loader's image input is from the naive pipeline's (open_clip's eval transform on the
full-size decode), in uint8 levels, on the bench's photos.

    from benchlib.pixels import pixel_table
    lines = pixel_table(files, size=224)

Rows: the loader's image path on the original JPEG (draft-mode decode at 1/2 scale + one bicubic box
resize), the same with torchvision's resize-then-crop instead of the box resize (the previous path),
and the loader's path on the bytes `shard-coco --resize 224` stores (downscaled at shard time and
re-encoded as JPEG quality 95). Each is compared with the naive tensor: mean and 99.9th percentile of
|difference| in levels (the normalised difference times std * 255), over all pixels and channels.
"""

from __future__ import annotations

from pathlib import Path

import torch


def pixel_table(files: list[Path], size: int) -> tuple[list[str], dict]:
    from PIL import Image

    from vlm_dist.data.images import check_image, decode_rgb
    from vlm_dist.data.samples import ImageToTensor

    itt = ImageToTensor(size)
    scale = itt.std * 255  # (3, 1, 1): normalised units -> uint8 levels
    rows = {"loader path (draft decode + box resize)": [], "draft decode + resize-then-crop (before)": [],
            "loader path on shard-coco --resize 224 bytes": []}
    for f in files:
        raw = f.read_bytes()
        naive = itt.transform(Image.open(f).convert("RGB"))  # full-size decode: the reference
        got = {"loader path (draft decode + box resize)": itt(raw),
               "draft decode + resize-then-crop (before)": itt.transform(decode_rgb(raw, size)),
               "loader path on shard-coco --resize 224 bytes": itt(check_image(raw, f.name, 224).data)}
        for name, x in got.items():
            rows[name].append(((x - naive).abs() * scale).flatten())
    out, lines = {}, ["| input vs naive (full decode + bicubic) | mean abs diff (levels) | 99.9th pct | max |",
                      "|---|---|---|---|"]
    for name, diffs in rows.items():
        d = torch.cat(diffs)
        q = torch.quantile(d[torch.randperm(len(d), generator=torch.Generator().manual_seed(0))[:1_000_000]], 0.999)
        out[name] = {"mean": d.mean().item(), "p999": q.item(), "max": d.max().item()}
        lines.append(f"| {name} | {out[name]['mean']:.2f} | {out[name]['p999']:.1f} | {out[name]['max']:.1f} |")
    return lines, out
