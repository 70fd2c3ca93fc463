"""The image encoder: an open_clip vision tower returning patch tokens.

    enc = VisionEncoder(VisionConfig(model_name="ViT-B-32", pretrained="openai"))
    tokens = enc(images)  # (B, 3, 224, 224) -> (B, 49, 768)
"""

from __future__ import annotations

import contextlib
import logging

import open_clip
import torch
from torch import nn

from vlm_dist.config import OPEN_CLIP_CONFIG_DIR, VisionConfig


class _QuietRandomInit(logging.Filter):
    """open_clip warns on every build without pretrained weights; with pretrained=None that is the intent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())


def _register_configs() -> None:
    if "vlm-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)


class PretrainedWeightsError(RuntimeError):
    """Pretrained vision weights cannot be had: a tag not in the hub cache with the hub unreachable or
    offline, or a checkpoint file that is missing or does not fit the architecture. `report` is False
    on ranks that only learned of another rank's failure (that rank prints the message)."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    """open_clip's own model factory (and its weight loading), keeping only the visual tower.

    `cfg.pretrained` is an open_clip pretrained tag (downloaded or from the hub cache) or the path of
    a local open_clip checkpoint (a state dict, optionally under "state_dict", as open_clip_train
    writes it); open_clip loads either strictly into the full CLIP model, whose `.visual` we keep.
    In training, vlm_dist.train.weights.fetch_once has put a tag's file in the cache before this runs.
    """
    _register_configs()
    try:
        clip = open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained, output_dict=False,
                                      force_quick_gelu=bool(cfg.quick_gelu))
    except Exception as err:  # open_clip raises RuntimeError / FileNotFoundError / HF errors with varying types
        where = ("the local open_clip checkpoint file" if cfg.pretrained and "/" in cfg.pretrained
                 else "the Hugging Face hub (or its cache)")
        raise PretrainedWeightsError(
            f"could not build vision tower {cfg.model_name!r} with pretrained={cfg.pretrained!r} from {where}: "
            f"{err}\nPass the path of a local open_clip checkpoint of this architecture as "
            f"model.vision.pretrained=/path/to/open_clip_checkpoint"
        ) from err
    tower = clip.visual
    tower.output_tokens = True
    tower.proj = None  # the pooled CLIP embedding is not used: drop its projection (no unused parameters)
    return tower


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = build_vision_tower(cfg)
        self.frozen = cfg.freeze
        if self.frozen:
            self.tower.requires_grad_(False)
        self.compiled = False  # True: the tower runs as one compiled graph (model.compile)

    @property
    def width(self) -> int:
        return self.cfg.geometry["width"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> patch tokens (B, P, W_vision); no graph is built when frozen."""
        ctx = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with ctx:
            return compiled_tokens()(self.tower, images) if self.compiled else tower_tokens(self.tower, images)


def tower_tokens(tower: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return tower(images)[1]  # (pooled, tokens): open_clip's output_tokens=True


_COMPILED_TOKENS = None


def compiled_tokens():
    """tower_tokens under torch.compile (inductor), made once: the whole open_clip tower as one graph (an
    inference graph when it is frozen), its norms, bias adds and activations fused."""
    global _COMPILED_TOKENS
    if _COMPILED_TOKENS is None:
        _COMPILED_TOKENS = torch.compile(tower_tokens)
    return _COMPILED_TOKENS
