"""Precomputed vision-tower features: shards whose samples hold the frozen tower's output, not a JPEG.

    vlm-dist precompute-features --shards data/shards/train --out data/features/train --config base

A frozen tower (the `base` preset: OpenAI's ViT-B-32) gives every image the same tokens in every epoch,
yet training decodes each JPEG and runs the tower again each time. On one H100 the compiled `base` step
takes 2350 samples/s while 16 cores decode 1337 resize-224 JPEGs/s (docs/bench/gpu_round7.md): the
loader sets the pace. `precompute_features` runs the tower once over shards and writes shards whose
samples hold its tokens (KEY.safetensors: "tokens", (P, W) in the stored dtype) beside the same
KEY.json / KEY.txt. The loader yields those tokens where it would yield pixels, and VLM.embed feeds
(B, P, W) tokens straight to the projector, as it feeds the tower's output for (B, 3, H, W) images.

The manifest's "features" record says what made them: the tower's name and pretrained weights, the image
size, the dtype, the token shape and a SHA-256 of the tower's weights. `check_features` (the trainer, at
start-up) refuses feature shards whose tower is not the model's, or a model whose tower would train.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from itertools import islice
from pathlib import Path

import torch

from vlm_dist.data.images import pixels_job
from vlm_dist.data.manifest import MANIFEST, Shard, ShardSpecError, resolve_shards
from vlm_dist.data.tario import TarWriter, kept_stats, write_json_atomic
from vlm_dist.devices import pick_device

EXT = "safetensors"  # the member that holds a sample's tokens (safetensors: no pickle, shape and dtype inside)
FORMAT = "vlm-dist/tower-features/1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class FeatureError(ValueError):
    """Feature shards that do not fit the model, or a sample whose tokens cannot be read; says what to do."""


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """SHA-256 of a tower's weights: every state-dict entry's name, dtype, shape and bytes, in name order
    (~0.3 s for ViT-B-32's 88M parameters on one core)."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode(tokens: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"tokens": tokens.contiguous()})


def decode(raw: bytes, key: str, url: str | None, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """A sample's KEY.safetensors bytes -> its (P, W) tokens; a clear FeatureError if they are damaged or
    not of `shape`."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tokens = load(raw)["tokens"]
    except (SafetensorError, KeyError, ValueError) as err:
        raise FeatureError(f"sample {key!r} in {url}: its .{EXT} member is damaged ({err}); rerun "
                           f"`vlm-dist precompute-features` on its source shards") from None
    if tokens.dim() != 2 or (shape is not None and tuple(tokens.shape) != tuple(shape)):
        raise FeatureError(f"sample {key!r} in {url}: tokens of shape {tuple(tokens.shape)}, expected {tuple(shape or ())} "
                           f"(image tokens, tower width); these shards were made for another tower")
    return tokens


def directory_record(directory: Path) -> dict | None:
    """The "features" record of a folder's manifest.json: None for image shards or a folder without one."""
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text()).get("features") if path.is_file() else None
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise ShardSpecError(f"{path} is damaged ({err}); rerun the command that wrote it") from None


def features_record(shards: list[Shard]) -> dict | None:
    """The "features" record of the shards' manifests: None for image shards; an error for a mix of image
    and feature shards, or features of different towers."""
    records = {d: directory_record(Path(d)) for d in sorted({str(Path(s.url).parent) for s in shards})}
    if len({json.dumps(r, sort_keys=True) for r in records.values()}) > 1:
        raise ShardSpecError(f"the shards mix image shards and feature shards, or features of different towers "
                             f"({', '.join(records)}): train on one kind from one tower")
    return next(iter(records.values()), None)


def check_features(record: dict | None, vision_cfg, fingerprint: str | None = None) -> None:
    """Refuse feature shards (`record`, features_record's) that the model cannot use in place of its tower:
    a tower that trains (its output would change, the stored one cannot), another architecture, activation
    or image size, or (given the `fingerprint` of the model's tower) other weights."""
    if record is None:
        return
    if not vision_cfg.freeze:
        raise FeatureError("the shards hold precomputed tower features, but model.vision.freeze=false would train the "
                           "tower, which they bypass: set model.vision.freeze=true, or train on the image shards")
    want = {"model_name": vision_cfg.model_name, "image_size": vision_cfg.geometry["image_size"],
            "quick_gelu": bool(vision_cfg.quick_gelu)}
    got = {k: record.get(k) for k in want}
    if got != want:
        raise FeatureError(f"the feature shards were made by tower {got}, the model has {want}: rerun "
                           f"`vlm-dist precompute-features` with this run's config")
    if fingerprint is not None and fingerprint != record.get("fingerprint"):
        raise FeatureError(f"the feature shards were made by other weights of {vision_cfg.model_name} "
                           f"(pretrained={record.get('pretrained')!r}) than the model's "
                           f"(pretrained={vision_cfg.pretrained!r}): rerun `vlm-dist precompute-features` with "
                           f"this run's model.vision.pretrained")


def _write_shard(url: str, out: Path, pool, encoder, normalize, size: int, dtype: torch.dtype, dev: torch.device,
                 batch_size: int, bar) -> dict:
    """One source shard's feature shard: its samples in the members' name order, tokens for the .jpg."""
    import webdataset as wds

    from vlm_dist.data.index import sample_problem
    from vlm_dist.data.samples import wanted_member

    raws, skipped, bad = [], Counter(), []
    for raw in wds.tarfile_samples([{"url": url}], select_files=wanted_member):
        if EXT in raw:  # a feature sample in shards without the manifest that says so
            raise FeatureError(f"{url} holds tower features (.{EXT} members), not images; give the image shards "
                               f"they were made from")
        problem = sample_problem(raw)
        if problem is None:
            raws.append(raw)
        else:
            skipped[problem] += 1
    raws.sort(key=lambda r: r["__key__"] + ".")  # the members' name order (TarWriter): "k." < "k-1."
    by_key = {r["__key__"]: r for r in raws}
    if len(by_key) < len(raws):
        raise FeatureError(f"{url} holds two samples with one key; a feature shard keeps one per key: rewrite the "
                           f"source shards (vlm-dist shard-coco writes unique keys)")
    items = [(r["__key__"], r["jpg"], size) for r in raws]
    decoded = pool.imap(pixels_job, items, chunksize=16) if pool else map(pixels_job, items)
    name = Path(url).name
    written = 0
    with TarWriter(out / name, sync_dir=False) as tar:
        while chunk := list(islice(decoded, batch_size)):
            good = [(k, px) for k, px, why in chunk if px is not None]
            bad += [{"shard": name, "key": k, "error": why} for k, px, why in chunk if px is None]
            bar.update(len(chunk))
            if not good:
                continue
            pixels = torch.stack([torch.frombuffer(bytearray(px), dtype=torch.uint8).view(size, size, 3)
                                  for _, px in good]).permute(0, 3, 1, 2)
            with torch.no_grad():
                tokens = encoder(normalize(pixels.to(dev)).to(dtype)).cpu()
            for (key, _), t in zip(good, tokens):
                members = {ext: by_key[key][ext] for ext in ("json", "txt") if ext in by_key[key]}
                members[EXT] = encode(t)
                for ext in sorted(members):  # json < safetensors < txt: the name order TarWriter needs
                    tar.add(f"{key}.{ext}", members[ext])
                written += 1
    skipped["bad_image"] += len(bad)
    return {"name": name, "samples": written, "bytes": tar.size, "sha256": tar.sha256,
            "skipped": {k: v for k, v in skipped.items() if v}, "bad_images": bad}


def precompute_features(src: str, out: Path, cfg, *, batch_size: int = 64, workers: int = 4,
                        dtype: str = "auto", device: str = "auto", progress: bool = True) -> dict:
    """Run cfg.model.vision's frozen tower over the image shards `src`; write feature shards (same names,
    same samples in key order, tokens instead of JPEGs) and their manifest into `out`. Samples the loader
    would skip are counted, images that fail to decode counted and listed, in the summary. A rerun into the
    same folder keeps the shards an earlier run finished from the same source files and tower (a
    NAME.tar.features.json beside each records what made it)."""
    import multiprocessing as mp

    from tqdm import tqdm

    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.data.shard import MANIFEST_FORMAT
    from vlm_dist.model.vision import VisionEncoder
    from vlm_dist.train.weights import fetch_once

    t0 = time.time()
    vision = cfg.model.vision
    if not vision.freeze:
        raise FeatureError("model.vision.freeze=false: a tower that trains changes its output every step, so its "
                           "features cannot be computed once; precompute features for a frozen tower only")
    if batch_size < 1 or workers < 0:
        raise FeatureError("--batch-size must be >= 1 and --workers >= 0")
    shards = resolve_shards(src)
    if features_record(shards) is not None:
        raise FeatureError(f"{src} holds feature shards already; give the image shards they were made from")
    out = Path(out)
    sources = {Path(s.url).parent.resolve() for s in shards}
    if out.resolve() in sources:
        raise FeatureError(f"--out {out} holds the source shards, which feature shards of the same names would "
                           f"replace: give another folder")
    if (out / MANIFEST).is_file() and directory_record(out) is None:
        raise FeatureError(f"--out {out} holds image shards (its {MANIFEST} has no features record): give an "
                           f"empty folder or one that precompute-features wrote")
    dev = pick_device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype not in DTYPES:
        raise FeatureError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    size = vision.geometry["image_size"]
    model_cfg = fetch_once(cfg.model, local_rank=0, device=dev)
    torch.manual_seed(cfg.train.seed)  # as the trainer seeds its model, whose tower is built first: a random tower
    encoder = VisionEncoder(model_cfg.vision).eval()  # (pretrained null: tests, benchmarks) is then the trainer's
    record = {"format": FORMAT, "model_name": vision.model_name, "pretrained": vision.pretrained, "image_size": size,
              "quick_gelu": bool(vision.quick_gelu), "tokens": cfg.model.n_image_tokens, "width": encoder.width, "dtype": dtype,
              "fingerprint": tower_fingerprint(encoder.tower)}
    encoder.to(dev, DTYPES[dtype])
    normalize = ImageToTensor(size).normalize
    out.mkdir(parents=True, exist_ok=True)
    entries, kept = [], 0
    bar = tqdm(total=sum(s.samples for s in shards), unit="img", desc="tower features", disable=not progress)
    # spawned, not forked: a fork would copy this process's CUDA context, which a child cannot use
    pool = mp.get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        for shard in shards:
            source = Path(shard.url).stat()
            made_from = {"source": shard.url, "source_bytes": source.st_size, "source_mtime_ns": source.st_mtime_ns,
                         "record": record}
            stats_path = out / f"{Path(shard.url).name}.features.json"
            entry = kept_stats(out / Path(shard.url).name, stats_path, made_from)  # a rerun: finished before?
            if entry is None:
                entry = _write_shard(shard.url, out, pool, encoder, normalize, size, DTYPES[dtype], dev, batch_size, bar)
                # not fsync'ed: a rerun keeps a shard only if this file matches AND the tar's bytes match its sha256
                write_json_atomic(stats_path, {**made_from, **entry}, durable=False)
            else:
                kept += 1
                bar.update(shard.samples)
            entries.append(entry)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    bad = [b for e in entries for b in e["bad_images"]]
    skipped = Counter()
    for e in entries:
        skipped.update(e["skipped"])  # bad_image included
    if not any(e["samples"] for e in entries):
        examples = "; ".join(f"{b['key']}: {b['error']}" for b in bad[:3])
        raise FeatureError(f"no sample written from {src}: skipped {dict(skipped)}" + (f" (e.g. {examples})" if bad else ""))
    summary = {"shards": len(entries), "kept": kept, "samples": sum(e["samples"] for e in entries),
               "skipped": dict(sorted((k, v) for k, v in skipped.items() if v)), "bad_images": bad,
               "bytes": sum(e["bytes"] for e in entries), "device": str(dev), "dtype": dtype,
               "elapsed_s": round(time.time() - t0, 3)}
    shard_list = [{k: e[k] for k in ("name", "samples", "bytes", "sha256")} for e in entries]
    write_json_atomic(out / MANIFEST, {"format": MANIFEST_FORMAT, "split": None, "shards": shard_list,
                                       "features": record, "source": str(src)})
    write_json_atomic(out / "summary.json", summary)
    return summary
