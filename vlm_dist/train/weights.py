"""Pretrained vision weights for a training run: fetched once per node, before any rank builds the model.

    from vlm_dist.train.weights import fetch_once
    model_cfg = fetch_once(cfg.model, local_rank=info.local_rank, device=info.device)  # after init_distributed
    model = VLM(model_cfg)   # vision.pretrained is now a local file: no rank touches the network here

With `model.vision.pretrained` an open_clip tag ('openai'), local rank 0 of each node resolves it
through open_clip's own download path (`open_clip.download_pretrained` -> `huggingface_hub.
hf_hub_download`): a cache hit, or one download into the Hugging Face cache (HF_HOME / HF_HUB_CACHE).
Every other rank waits at a collective until each node's local rank 0 is done, then finds the file in
its node's cache (`huggingface_hub.try_to_load_from_cache`, no network). If a local rank 0 failed
(offline or hub unreachable, and the file not cached), every rank raises PretrainedWeightsError; only
the rank that saw the failure carries the message (`report=True`), so it is printed once per failing
node, not once per GPU. A local checkpoint path or pretrained=null passes through unchanged.

The hub access and the collective are parameters (`hub=`, `any_failed=`) so that a test can run two
ranks against a stand-in hub that counts downloads.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import torch

from vlm_dist.config import ModelConfig, VisionConfig
from vlm_dist.model.vision import PretrainedWeightsError


class Hub(Protocol):
    def download(self, cfg: VisionConfig) -> str:
        """The local file of cfg.pretrained, from the cache or downloaded into it (may use the network)."""

    def cached(self, cfg: VisionConfig) -> str | None:
        """The local file of cfg.pretrained if the cache holds it, else None (never uses the network)."""


def _hub_location(cfg: VisionConfig) -> tuple[str, list[str]]:
    """(hub repo id, candidate file names in open_clip's order of preference) of an open_clip tag."""
    import open_clip
    from open_clip.pretrained import HF_WEIGHTS_NAME, _get_safe_alternatives

    pcfg = open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained) or {}
    if not pcfg.get("hf_hub"):
        raise PretrainedWeightsError(f"model.vision.pretrained={cfg.pretrained!r}: open_clip has no Hugging Face "
                                     f"hub entry for it with {cfg.model_name!r}; pass "
                                     f"model.vision.pretrained=/path/to/open_clip_checkpoint")
    repo, filename = os.path.split(pcfg["hf_hub"])  # 'org/name/' (default file name) or 'org/name/file'
    filename = filename or HF_WEIGHTS_NAME
    return repo, [*_get_safe_alternatives(filename), filename]


class OpenClipHub:
    """The real hub: open_clip's download path and the huggingface_hub cache."""

    def download(self, cfg: VisionConfig) -> str:
        import open_clip

        try:
            path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(cfg.model_name, cfg.pretrained))
        except Exception as err:  # open_clip wraps the HF errors in FileNotFoundError, its URL path raises others
            raise PretrainedWeightsError(unavailable_message(cfg, err)) from None
        if not path:
            raise PretrainedWeightsError(unavailable_message(cfg, "open_clip found no download source"))
        return path

    def cached(self, cfg: VisionConfig) -> str | None:
        from huggingface_hub import try_to_load_from_cache

        repo, names = _hub_location(cfg)
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):  # (a cached "does not exist" marker is not a str)
                return hit
        return None


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def unavailable_message(cfg: VisionConfig, err: BaseException | str) -> str:
    """The one message for a pretrained tag that is neither cached nor downloadable."""
    from huggingface_hub import constants

    try:
        repo, names = _hub_location(cfg)
        source = f"{names[-1]} (or {', '.join(names[:-1])}) of the Hugging Face hub repo {repo}" if names[:-1] \
            else f"{names[-1]} of the Hugging Face hub repo {repo}"
    except PretrainedWeightsError:
        repo, source = None, "open_clip's download URL"
    if constants.HF_HUB_OFFLINE:
        why = f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')} is set, so nothing is downloaded"
    else:
        why = f"the hub could not be reached (HF_HUB_OFFLINE is not set): {_root_cause(err)}"
    return (
        f"cannot load the pretrained vision weights: model {cfg.model_name!r} with pretrained={cfg.pretrained!r} "
        f"is {source}; it is not in the hub cache {cache_dir()} and {why}.\n"
        f"Either\n"
        f"  - let local rank 0 of each node download it once: unset HF_HUB_OFFLINE on a machine that reaches "
        f"huggingface.co (HF_HOME / HF_HUB_CACHE choose the cache), or\n"
        f"  - use a local open_clip checkpoint file: --set model.vision.pretrained=/path/to/open_clip_checkpoint"
    )


def _root_cause(err: BaseException | str) -> str:
    """The innermost exception of a chain (the network error under open_clip's and HF's wrappers)."""
    if isinstance(err, str):
        return err
    seen = [err]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    root = seen[-1]
    text = " ".join(str(root).split())
    return f"{type(root).__name__}: {text[:200]}" if text else type(root).__name__


def any_rank_true(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if `flag` is true on any rank; an all-reduce, so also a barrier."""
    from vlm_dist.train.dist import all_reduce_sum

    return bool(all_reduce_sum([float(flag)], device or torch.device("cpu"))[0] > 0)


def fetch_once(model_cfg: ModelConfig, *, local_rank: int, device: torch.device | None = None,
               hub: Hub | None = None, any_failed: Callable[[bool], bool] | None = None) -> ModelConfig:
    """`model_cfg` with vision.pretrained resolved to a local file (see the module docstring).

    Every rank must call it (it runs a collective) unless pretrained is null or already a file."""
    vision = model_cfg.vision
    if vision.pretrained is None or os.path.isfile(vision.pretrained):
        return model_cfg  # random init or a local checkpoint: nothing to fetch (a bad path fails in the build)
    if os.sep in vision.pretrained or vision.pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise PretrainedWeightsError(f"model.vision.pretrained={vision.pretrained!r}: no such checkpoint file; "
                                     f"give the path of an existing open_clip checkpoint file")
    hub = hub or OpenClipHub()
    any_failed = any_failed or (lambda flag: any_rank_true(flag, device))
    path, error = None, None
    if local_rank == 0:
        try:
            path = hub.download(vision)
        except PretrainedWeightsError as err:
            error = err
    # The collective is the barrier: no rank gets past it before every node's local rank 0 is done.
    if any_failed(error is not None):
        raise error or PretrainedWeightsError("another rank could not fetch the pretrained vision weights",
                                              report=False)
    if path is None:
        path = hub.cached(vision) or hub.download(vision)  # a cache not shared with local rank 0: fetch it too
    return model_cfg.model_copy(update={"vision": vision.model_copy(update={"pretrained": path})})
