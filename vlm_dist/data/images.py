"""Image checks for the shard writer and fast decoding for the loader.

    from vlm_dist.data.images import check_image, ImageReject
    ok = check_image(raw_bytes, name="000000391895.jpg", resize=None, verify="header")   # -> CheckedImage

The writer keeps a file's JPEG bytes untouched when they are a readable 8-bit RGB JPEG and no resize
is asked for. Anything else readable (grayscale, CMYK, palette, alpha, PNG/GIF/WebP bytes, whatever
the file is named) is converted to an RGB JPEG and the reason is recorded. Zero-byte, unidentifiable,
corrupt or truncated files are rejected (ImageReject with a reason code), as are high-bit-depth modes
whose 8-bit rendering would be a guess.

How hard a kept (RGB JPEG, not resized) file is checked is the `verify` level; every other file is
decoded anyway (to convert or resize it), so decoding errors always reject it:
  full    PIL header + the JPEG's marker structure + a decode at 1/8 scale (libjpeg still Huffman-decodes
          every byte of the scan data, so it also rejects scan data libjpeg finds fatal). ~2.3 ms/image.
  header  PIL header (format, mode, size) + the marker structure from the bytes (SOI, segments up to
          the start of scan, an end-of-image marker after it): catches zero-byte, non-image,
          cut-short (the usual damage: interrupted download or copy) and header-damaged files, with no
          pixel decoding. Scan data damaged in the middle of an otherwise complete file goes through,
          as it does at `full` for most such damage (libjpeg warns and decodes garbage, see
          docs/bench/issue13_round3.md).
  none    PIL header only (zero-byte and non-image files are still rejected; truncation is not checked).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

JPEG_QUALITY = 95
# 16-bit / 32-bit integer and float images: no canonical 8-bit RGB rendering, so refuse them.
REFUSED_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MODE_NAMES = {"L": "grayscale", "LA": "grayscale+alpha", "1": "1-bit", "P": "palette", "PA": "palette+alpha",
              "CMYK": "CMYK", "RGBA": "RGBA", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV", "RGB": "RGB"}


class ImageReject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class CheckedImage:
    data: bytes  # the JPEG bytes to store
    width: int
    height: int
    original_width: int
    original_height: int
    converted: str | None  # why the bytes were re-encoded (None = original bytes kept)
    resized: bool


VERIFY_LEVELS = ("full", "header", "none")
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: markers without a length field


def jpeg_structure_problem(raw: bytes) -> tuple[str, str] | None:
    """(reason, detail) if the JPEG's marker structure is broken, else None; reads headers only.

    Walks the segments from SOI to the first start-of-scan (SOS), then looks for the end-of-image
    marker FFD9 after the scan header. Entropy-coded data cannot contain FFD9 (a 0xFF byte there is
    followed by 0x00 or a restart marker), so its absence means the file was cut short. Bytes after
    EOI (some cameras append data) are allowed, as libjpeg allows them."""
    n = len(raw)
    if raw[:2] != b"\xff\xd8":
        return "corrupt_image", "JPEG without the start-of-image marker FFD8"
    i = 2
    while True:
        while i < n and raw[i] != 0xFF:  # junk between segments (libjpeg skips it with a warning)
            i += 1
        while i < n and raw[i] == 0xFF:  # fill bytes
            i += 1
        if i + 2 >= n:
            return "truncated_image", f"file ends at byte {n} inside the JPEG headers, before the scan data"
        marker = raw[i]
        if marker in _STANDALONE:
            i += 1
            continue
        if marker == 0xD9:
            return "corrupt_image", "end-of-image marker before any scan data"
        length = int.from_bytes(raw[i + 1 : i + 3], "big")
        if length < 2:
            return "corrupt_image", f"JPEG segment FF{marker:02X} at byte {i - 1} has length {length}"
        i += 1 + length
        if i > n:
            return "truncated_image", f"file ends at byte {n} inside JPEG segment FF{marker:02X}"
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
    if raw.rfind(b"\xff\xd9", i) < 0:
        return "truncated_image", f"no end-of-image marker after the scan data ({n} bytes): the file is cut short"
    return None


def _load(raw: bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode; map PIL's failures to reject reasons."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images would pass unnoticed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            if draft is not None:
                img.draft("RGB", draft)
            img.load()
        return img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReject("image_too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        msg = str(err)
        reason = "truncated_image" if "truncated" in msg or isinstance(err, EOFError) else "corrupt_image"
        raise ImageReject(reason, msg or type(err).__name__) from None


def check_image(raw: bytes, name: str = "", resize: int | None = None, verify: str = "full") -> CheckedImage:
    """Verify (to the `verify` level, see the module docstring), convert if needed and optionally
    downscale (shorter side to `resize`) one image file."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify={verify!r}: use one of {', '.join(VERIFY_LEVELS)}")
    if not raw:
        raise ImageReject("empty_file", "zero-byte file")
    try:
        probe = Image.open(io.BytesIO(raw))
        fmt, mode, (w, h) = probe.format, probe.mode, probe.size
        if fmt != "JPEG":
            probe.verify()  # PNG: chunk CRCs without decoding pixels (PIL's JPEG plugin has no verify)
    except UnidentifiedImageError:
        raise ImageReject("unreadable_image", "not an image format PIL can identify") from None
    except Image.DecompressionBombError as err:
        raise ImageReject("image_too_large", str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated_image" if "truncated" in str(err).lower() or isinstance(err, EOFError) else "corrupt_image"
        raise ImageReject(reason, f"verify failed: {err}") from None
    if mode in REFUSED_MODES:
        raise ImageReject("unsupported_mode", f"{fmt} in mode {mode} (high bit depth); convert it to 8-bit RGB first")
    needs_resize = resize is not None and min(w, h) > resize
    if fmt == "JPEG" and verify != "none" and (problem := jpeg_structure_problem(raw)) is not None:
        raise ImageReject(*problem)
    if fmt == "JPEG" and mode == "RGB" and not needs_resize:
        if verify == "full":
            # Decode at 1/8 scale: every byte of the entropy-coded data is still Huffman-decoded.
            _load(raw, draft=(max(1, w // 8), max(1, h // 8)))
        return CheckedImage(raw, w, h, w, h, None, False)

    img = _load(raw, draft=(resize, resize) if needs_resize and fmt == "JPEG" else None)
    reasons = []
    if fmt != "JPEG":
        named = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        reasons.append(f"{fmt} bytes named .{named}" if named in ("jpg", "jpeg") else f"{fmt} -> JPEG")
    if mode != "RGB":
        reasons.append(f"{MODE_NAMES.get(mode, mode)} ({mode}) -> RGB")
    img = _to_rgb(img)
    if needs_resize:
        # The size torchvision's Resize(resize) gives the original (long side floored), so that for a tower of
        # input `resize` the loader's own Resize is a no-op and its centre crop falls where it would have.
        (new_w, new_h), _ = resize_crop_box(w, h, resize)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=JPEG_QUALITY)
    return CheckedImage(buf.getvalue(), img.width, img.height, w, h, "; ".join(reasons) or None, needs_resize)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """torchvision's Resize(size) (shorter side to `size`, bicubic) + CenterCrop(size) as ONE PIL resize:
    (the resized image's size, the source box whose resize to (size, size) is the crop).

    PIL computes each output pixel's filter from the box origin and the scale, clamping its support to
    the whole source image, not to the box, so when downscaling a landscape image (a crop in x), resizing
    the box straight to (size, size) gives the pixels of resize-then-crop but for rounding (a level or
    two in < 0.1 % of the values; tests/test_data_loader.py), without resampling the columns the crop
    throws away (model_pixels uses it only there)."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)  # torchvision's _compute_resized_output_size (max_size=None)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))  # CenterCrop's offsets
    sx, sy = width / new_w, height / new_h
    return (new_w, new_h), (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def model_pixels(raw: bytes, size: int) -> Image.Image:
    """JPEG (or other) bytes -> the (size x size) RGB image the vision tower sees, uint8: draft-mode
    decode (decode_rgb), then open_clip's eval geometry (bicubic Resize(size) + CenterCrop(size)) in one
    box resize (resize_crop_box). Normalisation is left to a batched tensor op (samples.ImageToTensor)."""
    img = decode_rgb(raw, size)
    (new_w, new_h), box = resize_crop_box(img.width, img.height, size)
    if new_w <= img.width and new_h <= img.height and (new_w, new_h) != img.size and new_h == size:
        return img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    # Otherwise torchvision's two steps as they are: upscaling (an image smaller than the tower's input,
    # rare), no resize, or a portrait image (a crop in y): PIL's box resize of these differs from
    # resize-then-crop by up to 10-20 levels (measured on noise; PIL 13), so it is only used for the
    # landscape and square downscales that it reproduces.
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pixels_job(item: tuple[str, bytes, int]) -> tuple[str, bytes | None, str | None]:
    """A decoding process's job (precompute-features): (key, image bytes, size) -> (key, model_pixels' uint8
    crop as bytes, or None and why not). Here, not beside its caller: a spawned process imports this module
    alone (PIL; 0.02 s), not torch (~1 s each): 2 spawned processes and their first 8 images took 1.18 s before
    and 0.07 s after the move on a 2-core AMD EPYC (docs/bench/gpu_round9.md)."""
    key, raw, size = item
    try:
        return key, model_pixels(raw, size).tobytes(), None
    except Exception as err:  # PIL raises many types for a bad image; counted and reported, never fatal
        return key, None, f"{type(err).__name__}: {err}"


def decode_rgb(raw: bytes, size: int) -> Image.Image:
    """Loader-side decode: JPEG draft mode (DCT scaling) when the image is at least twice the target,
    so a 640x480 COCO image decodes at 320x240 for a 224 tower; then RGB."""
    img = Image.open(io.BytesIO(raw))
    if min(img.size) >= 2 * size:
        img.draft("RGB", (size, size))  # keeps both sides >= size; no-op for non-JPEG
    return img.convert("RGB")
