"""Raw tar sample -> model inputs: decode (jpg/json/txt only), pick caption or Q&A, tokenize, batch.

    prep = SamplePreparer(cfg, seed=0)
    batch = collate([prep(raw, epoch=0) for raw in raws], prep)   # the dict described in loader.py

Only the members named in WANTED are ever read from a tar (selected by name before their bytes are
loaded), so a `.pyd` / `.pickle` / `.pth` member is never unpickled, or even read. A sample's image is
its .jpg, or in feature shards (data/features.py) its .safetensors: the frozen tower's (P, W) tokens. The per-sample
choice (caption vs question, which caption, which question) comes from an RNG seeded by
(seed, epoch, sample key), never from stream state, so skipping samples cannot change it.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.data import get_worker_info

from vlm_dist.config import RunConfig
from vlm_dist.data.epochs import rng_for
from vlm_dist.data.features import EXT as FEATURES
from vlm_dist.data.features import decode as decode_features
from vlm_dist.data.images import model_pixels
from vlm_dist.text import IGNORE_INDEX, Example, add_turns, build_example, collate_examples, get_tokenizer, make_targets

IMAGE_MEMBERS = ("jpg", FEATURES)  # a sample's image: a JPEG, or the frozen tower's tokens (feature shards)
WANTED = frozenset({*IMAGE_MEMBERS, "json", "txt"})


def wanted_member(fname: str) -> bool:
    """webdataset `select_files` predicate: keep KEY.jpg / KEY.safetensors / KEY.json / KEY.txt, skip the rest."""
    base = fname.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in WANTED


class ImageToTensor:
    """The model's image input, shared by training and inference so they cannot drift apart:
    JPEG bytes -> draft-mode decode + open_clip's eval geometry as one box resize (images.model_pixels)
    -> open_clip's ToTensor + Normalize. `pixels` stops at uint8 so that the loader normalises a whole
    batch in one tensor op (`normalize`); the float values equal open_clip's eval transform applied to
    the draft-decoded image (tests/test_data_loader.py)."""

    def __init__(self, size: int):
        import open_clip

        self.size = size
        self.transform = open_clip.image_transform(size, is_train=False)  # the reference; its mean and std
        norm = self.transform.transforms[-1]
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(3, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def pixels(self, raw: bytes) -> torch.Tensor:
        """(3, S, S) uint8."""
        img = model_pixels(raw, self.size)
        return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., 3, S, S) uint8, on any device -> float32, contiguous: ToTensor's x / 255 then Normalize's
        (x - mean) / std, the same float32 operations in the same order, so the values are bit-identical
        to theirs (the trainer runs this on the device: train/loop.py to_device)."""
        if pixels.dtype != torch.uint8:  # a float tensor is the model's input already: a second pass would corrupt it
            raise TypeError(f"normalize takes uint8 pixels (a loader batch's images, ImageToTensor.pixels); got "
                            f"{pixels.dtype}: float images are already normalised (ImageToTensor.__call__), feed "
                            f"them to the model as they are")
        if pixels.device not in self._on_device:  # copied once: a host -> GPU copy each step would wait for the GPU
            self._on_device[pixels.device] = (self.mean.to(pixels.device), self.std.to(pixels.device))
        mean, std = self._on_device[pixels.device]
        out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
        return out.copy_(pixels).div_(255).sub_(mean).div_(std)

    def __call__(self, raw: bytes) -> torch.Tensor:
        return self.normalize(self.pixels(raw))  # (3, S, S) float32


def draw_turns(pairs: list, rng, turns: int) -> list:
    """The Q&A pairs of one question sample: a random pair, then up to turns - 1 other pairs of the same
    image in random order (data.qa_turns). The later ones are drawn only when turns > 1, so a one-turn
    sample takes the same random numbers as ever (rng.choice draws like randrange)."""
    pick = rng.randrange(len(pairs))
    if turns == 1:
        return [pairs[pick]]
    others = pairs[:pick] + pairs[pick + 1 :]
    return [pairs[pick], *rng.sample(others, min(turns - 1, len(others)))]


class SamplePreparer:
    """Callable turning one raw webdataset sample (bytes per extension) into one prepared sample."""

    def __init__(self, cfg: RunConfig, seed: int, features: bool = False):
        """features: the shards' manifests say their samples hold tower tokens (data/features.py), not JPEGs."""
        self.features = features
        self.image_size = cfg.model.vision.geometry["image_size"]
        self.to_tensor = ImageToTensor(self.image_size)
        self.feature_shape = (cfg.model.n_image_tokens, cfg.model.vision.geometry["width"])
        self.tok = get_tokenizer()
        self.max_len = cfg.data.max_text_len
        self.n_future = cfg.model.n_future
        self.qa_fraction = cfg.data.qa_fraction
        self.qa_turns = cfg.data.qa_turns
        self.seed = seed

    def __call__(self, raw: dict, epoch: int) -> dict:
        key, url = raw["__key__"], raw.get("__url__")
        if (FEATURES in raw) != self.features and any(m in raw for m in IMAGE_MEMBERS):
            raise ValueError(f"sample {key!r} in {url} holds " + (
                f"tower features (.{FEATURES}) but its shards' manifest.json has no features record (copied without "
                f"it, or rewritten by index-shards): train on the folder precompute-features wrote, manifest included"
                if FEATURES in raw else "a .jpg but its shards' manifest.json says tower features: the folder mixes "
                "image and feature shards; keep them apart"))
        if not any(m in raw for m in IMAGE_MEMBERS) or ("json" not in raw and "txt" not in raw):
            raise ValueError(f"sample {key!r} in {url} lacks an image (.jpg or .{FEATURES}), or both .json and .txt; write shards with "
                             f"`vlm-dist shard-coco` or index them with `vlm-dist index-shards`")
        meta = json.loads(raw["json"]) if "json" in raw else {}  # img2dataset: caption in .txt
        captions = list(meta.get("captions") or [])
        if not captions and "txt" in raw:  # img2dataset-style shards: the caption lives in .txt
            captions = [raw["txt"].decode("utf-8").strip()]
        qa = list(meta.get("qa") or [])
        if not captions and not qa:
            raise ValueError(f"sample {key!r} in {url} has neither captions nor Q&A pairs")
        rng = rng_for("sample", self.seed, epoch, key)
        use_qa = rng.random() < self.qa_fraction
        if qa and (use_qa or not captions):
            pair, *more = draw_turns(qa, rng, self.qa_turns)
            kind, question, target, refs = "qa", pair["question"], pair["answer"], [pair["answer"]]
        else:
            kind, question, target, refs = "caption", None, captions[rng.randrange(len(captions))], captions
            more = []
        example, question = self._example(target, question, captions, rng, [(p["question"], p["answer"]) for p in more])
        if question is None and kind == "qa":  # the question did not fit: fell back to a caption
            kind, refs = "caption", captions
        bad = None
        if FEATURES in raw:  # (P, W) tokens of the frozen tower, in the dtype they were stored in
            image = decode_features(raw[FEATURES], key, url, self.feature_shape)
        else:
            try:
                image = self.to_tensor.pixels(raw["jpg"])  # (3, H, W) uint8: collate normalises the batch at once
            except Exception as err:  # PIL raises many types for a bad image: this sample trains nothing (below)
                image = torch.zeros((3, self.image_size, self.image_size), dtype=torch.uint8)
                bad = f"{type(err).__name__}: {err}".replace("<_io.BytesIO object", "<the .jpg member")
        # A sample whose image does not decode keeps its place (every rank's batches stay as planned) as padding
        # whose targets collate masks: no loss, no gradient, not in validation; the loader reports it.
        return {"image": image, "example": example, "key": key, "image_id": int(meta.get("image_id", -1)),
                "kind": kind, "question": question, "references": refs, "url": url, "bad": bad,
                "is_pad": bool(raw.get("__pad__", False)) or bad is not None}

    def _example(self, target: str, question: str | None, captions: list[str], rng,
                 more: list[tuple[str, str]]) -> tuple[Example, str | None]:
        try:
            example = build_example(self.tok, target, self.max_len, question)
        except ValueError:
            if question is None:
                raise
        else:
            return (add_turns(self.tok, example, more, self.max_len)[0] if more else example), question
        if captions:  # the prompt leaves no room for the answer: use a caption of the same image instead
            return build_example(self.tok, captions[rng.randrange(len(captions))], self.max_len), None
        words = question.split()
        while len(words) > 1:  # no caption to fall back on: shorten the question until the answer fits
            words = words[:-1]
            try:
                return build_example(self.tok, target, self.max_len, " ".join(words)), " ".join(words)
            except ValueError:
                continue
        raise ValueError(f"data.max_text_len={self.max_len} is too short for any question prompt; raise it")


def is_pixels(images: torch.Tensor) -> bool:
    """A batch's images are uint8 pixels (B, 3, H, W) to normalise and encode, not the frozen tower's
    precomputed tokens (B, P, W) from feature shards (data/features.py)."""
    return images.dtype == torch.uint8


def normalize_images(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """A batch's images (B, 3, S, S) uint8 (any device) -> the model's float32 input (ImageToTensor.normalize)."""
    return _image_to_tensor(size).normalize(pixels)


@lru_cache(maxsize=4)
def _image_to_tensor(size: int) -> ImageToTensor:
    return ImageToTensor(size)


def collate(samples: list[dict], prep: SamplePreparer) -> dict:
    """Stack prepared samples; text padded to the FIXED length max_text_len, so every batch has the
    same shapes: input_ids (B, max_text_len-1), targets (B, n_future, max_text_len-1). Images stay
    uint8 (4x fewer bytes to move from a worker and to the GPU); normalize_images makes them the
    model's float input, on the device."""
    tokens, mask = collate_examples([s["example"] for s in samples], prep.tok.pad_id)  # (B, L') with L' <= max_len
    extra = prep.max_len - tokens.shape[1]
    tokens = F.pad(tokens, (0, extra), value=prep.tok.pad_id)  # (B, max_len)
    mask = F.pad(mask, (0, extra), value=False)
    input_ids, targets = make_targets(tokens, mask, prep.n_future)
    bad = [i for i, s in enumerate(samples) if s.get("bad")]
    if bad:
        targets[bad] = IGNORE_INDEX  # an image that did not decode: the sample trains nothing
    return {
        "images": _stack(samples, get_worker_info() is not None),  # (B, 3, H, W) uint8, or tokens (B, P, W)
        "input_ids": input_ids,  # (B, T) long, T = max_text_len - 1
        "targets": targets,  # (B, n_future, T) long, IGNORE_INDEX where no target
        "keys": [s["key"] for s in samples],
        "image_ids": [s["image_id"] for s in samples],
        "kinds": [s["kind"] for s in samples],
        "questions": [s["question"] for s in samples],
        "references": [s["references"] for s in samples],
        "is_pad": torch.tensor([s["is_pad"] for s in samples], dtype=torch.bool),  # (B,)
        "truncated": torch.tensor([s["example"].truncated for s in samples], dtype=torch.bool),  # (B,)
        "bad": [(samples[i]["key"], samples[i]["url"], samples[i]["bad"]) for i in bad],  # undecodable images
    }


def _stack(samples: list[dict], shared: bool) -> torch.Tensor:
    """torch.stack of the samples' images (uint8 pixels, or tower tokens); in a DataLoader worker straight into shared memory (as
    torch's default_collate does), so sending the batch to the main process copies it no more."""
    first = samples[0]["image"]
    out = torch.empty((len(samples), *first.shape), dtype=first.dtype)
    if shared:
        out.share_memory_()  # (empty: nothing to copy yet)
    return torch.stack([s["image"] for s in samples], out=out)
