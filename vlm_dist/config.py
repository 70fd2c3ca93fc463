"""Run configuration: nested pydantic sections, named presets, file loading and dotted overrides.

    from vlm_dist.config import load_config
    cfg = load_config("tiny", overrides=["model.n_layers=4", "model.vision.freeze=false"])

Every field is documented where it is declared, so `--help`, `vlm-dist config show` and validation
errors all come from this file. The DeepSpeed JSON owns batch sizes, optimizer, scheduler, precision
and ZeRO stage; nothing here duplicates those (the trainer checks the two agree).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

OPEN_CLIP_CONFIG_DIR = Path(__file__).parent / "open_clip_configs"


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names the field and the fix."""


class Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@lru_cache(maxsize=None)
def vision_geometry(model_name: str) -> dict[str, int]:
    """Image size, patch size, width and patch-token count of an open_clip vision tower, from its
    architecture config alone (no weights are built). Registers this package's tiny towers first."""
    import open_clip

    if model_name.startswith("vlm-") and model_name not in open_clip.list_models():
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(
            f"model.vision.model_name: unknown open_clip model {model_name!r}; "
            f"pick one of open_clip.list_models(), e.g. 'ViT-B-32'"
        )
    v = cfg["vision_cfg"]
    if "timm_model_name" in v or not isinstance(v.get("image_size"), int):
        raise ConfigError(
            f"model.vision.model_name: {model_name!r} is not a square open_clip ViT; use a ViT such as 'ViT-B-32'"
        )
    image, patch = v["image_size"], v["patch_size"]
    if image % patch:
        raise ConfigError(f"model.vision.model_name: image size {image} is not divisible by patch size {patch}")
    return {"image_size": image, "patch_size": patch, "width": v["width"], "n_tokens": (image // patch) ** 2}


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or "." in value or Path(value).exists()


class VisionConfig(Section):
    model_name: str = Field(
        "ViT-B-32",
        description="open_clip model whose vision tower encodes the image (any square ViT in "
        "open_clip.list_models(); 'vlm-tiny-vit' is this package's small tower: 32 px, patch 8, width 32, one block).",
    )
    pretrained: str | None = Field(
        None,
        description="Vision weights: an open_clip pretrained tag (e.g. 'openai': downloaded once from the "
        "Hugging Face hub into its cache by local rank 0 of each node, then read from the cache) or the path of "
        "a local open_clip checkpoint file; null = random initialisation.",
    )
    freeze: bool = Field(True, description="Freeze the vision tower (no gradients, not in the optimizer).")
    allow_random_frozen: bool = Field(
        False,
        description="Allow freeze=true with pretrained=null: a tower that stays at its random initialisation "
        "(for benchmarks and tests). Without it such a config is refused at load.",
    )
    quick_gelu: bool | None = Field(
        None,
        description="QuickGELU activation in the tower (what OpenAI's CLIP weights were trained with); null = "
        "what the pretrained tag's open_clip config says (true for 'openai'), false without a tag. Stored "
        "resolved, so an export rebuilds the activation it was trained with.",
    )

    @model_validator(mode="after")
    def _check_weights(self) -> "VisionConfig":
        tag = self.pretrained
        if tag is not None and not _looks_like_path(tag):
            import open_clip

            tags = open_clip.list_pretrained_tags_by_model(self.model_name)
            if tag not in tags:
                raise ValueError(
                    f"pretrained={tag!r} is neither an open_clip pretrained tag of {self.model_name!r} "
                    f"({', '.join(tags) or 'it has none'}) nor a path; set model.vision.pretrained to one of "
                    f"those tags or to /path/to/open_clip_checkpoint"
                )
        built_in = _model_quick_gelu(self.model_name)  # e.g. 'ViT-B-32-quickgelu' always has it
        if self.quick_gelu is None:
            self.quick_gelu = built_in or bool(tag is not None and not _looks_like_path(tag)
                                               and _pretrained_cfg(self.model_name, tag).get("quick_gelu", False))
        elif built_in and not self.quick_gelu:
            raise ValueError(f"quick_gelu=false, but open_clip's {self.model_name!r} always uses QuickGELU; "
                             f"drop model.vision.quick_gelu or pick a model name without '-quickgelu'")
        if self.freeze and tag is None and not self.allow_random_frozen:
            raise ValueError(
                "model.vision.freeze=true with model.vision.pretrained=null would train beside a frozen, randomly initialised vision "
                "tower; set model.vision.pretrained (a tag such as 'openai', or /path/to/open_clip_checkpoint), "
                "or model.vision.freeze=false to train the tower, or model.vision.allow_random_frozen=true "
                "if a frozen random tower is really meant"
            )
        return self

    @property
    def geometry(self) -> dict[str, int]:
        return vision_geometry(self.model_name)


def _model_quick_gelu(model_name: str) -> bool:
    import open_clip

    vision_geometry(model_name)  # registers this package's towers; unknown names fail here, with the fix
    return bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False))


def _pretrained_cfg(model_name: str, tag: str) -> dict:
    import open_clip

    return open_clip.get_pretrained_cfg(model_name, tag) or {}


class ModelConfig(Section):
    vision: VisionConfig = Field(default_factory=VisionConfig, description="The image encoder.")
    d_model: int = Field(768, gt=0, description="Decoder width (the projector maps vision width to this).")
    n_layers: int = Field(24, gt=0, description="Causal transformer blocks in the decoder trunk.")
    n_heads: int = Field(8, gt=0, description="Attention heads per block; must divide d_model.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width as a multiple of d_model.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention output and MLP output.")
    max_seq_len: int = Field(
        128, gt=2, description="Longest sequence (image tokens + text tokens) the decoder accepts; sizes the KV cache."
    )
    tie_embeddings: bool = Field(True, description="Share the LM head's unembedding with the token embedding.")
    n_future: int = Field(
        1, ge=1, le=8, description="Tokens predicted per position: 1 = next token only; n > 1 adds heads for t+2..t+n."
    )
    mtp_weights: list[float] | None = Field(
        None, description="Loss weight of each head (length n_future, next-token head first); null = all 1."
    )
    activation_checkpointing: bool = Field(
        True, description="Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint)."
    )
    compile: bool = Field(
        False, description="Regional torch.compile (inductor): the vision tower, the decoder blocks' whole-sequence "
        "forward (one graph serves every block) and the head loss's per-chunk softmax kernels; fewer, fused kernels "
        "where the GPU, not the host, sets the pace (docs/BENCHMARKS.md). The first steps compile (seconds to a "
        "minute); the decoder's cached decoding stays eager, and so does a ZeRO-3 run (the trainer says so). "
        "Numerics differ from eager by float reassociation only.",
    )
    attention: Literal["sdpa", "explicit"] = Field(
        "sdpa",
        description="'sdpa' = fused torch scaled_dot_product_attention; 'explicit' = softmax(QK^T/sqrt(d))V "
        "reference, for tests and benchmarks only.",
    )
    text_first_layers: int = Field(
        0, ge=0, description="In the first N decoder blocks text tokens attend only to text (image tokens still "
        "attend to earlier image tokens), so the question's words are gathered before any block reads the image "
        "and an answer can be routed by them ('what colour is the circle?'). 0 = every block attends across "
        "image and text. On the demo task colour questions about one of two shapes never left the no-routing "
        "ceiling with 0 (docs/bench/issue10_round4.md).",
    )
    init_std: float = Field(0.02, gt=0, description="Std of the normal initialisation of linear and embedding weights.")
    pos_scale: float = Field(
        0.02, ge=0, description="Amplitude of the sinusoidal positions added to the embeddings. Unit-amplitude "
        "sinusoids would swamp token and image features initialised at std ~init_std (on the demo task: "
        "0.68 vs 0.76 val token accuracy after 300 steps).",
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"set model.d_model to a multiple of {self.n_heads} or change model.n_heads"
            )
        if self.mtp_weights is not None and len(self.mtp_weights) != self.n_future:
            raise ValueError(
                f"mtp_weights has {len(self.mtp_weights)} entries but n_future={self.n_future}; "
                f"give one weight per head or set model.mtp_weights=null"
            )
        if self.text_first_layers > self.n_layers:
            raise ValueError(
                f"text_first_layers={self.text_first_layers} exceeds n_layers={self.n_layers}; "
                f"set model.text_first_layers <= {self.n_layers}"
            )
        n_img = self.vision.geometry["n_tokens"]
        if self.max_seq_len < n_img + 2:
            raise ValueError(
                f"max_seq_len={self.max_seq_len} leaves no room for text after {n_img} image tokens; "
                f"set model.max_seq_len >= {n_img + 2}"
            )
        return self

    @property
    def head_weights(self) -> list[float]:
        return self.mtp_weights if self.mtp_weights is not None else [1.0] * self.n_future

    @property
    def n_image_tokens(self) -> int:
        return self.vision.geometry["n_tokens"]


class DataConfig(Section):
    train_shards: str | None = Field(
        None, description="Training shards: a brace pattern such as 'data/shards/train-{00000..00009}.tar', a shard-coco "
        "directory, or a folder of webdataset tars (img2dataset; scanned at start-up without a manifest.json)."
    )
    val_shards: str | None = Field(None, description="Validation shards (same forms as train_shards).")
    max_text_len: int = Field(
        32, ge=3, description="Text tokens per sample including begin and end tokens; longer targets are truncated."
    )
    qa_fraction: float = Field(
        0.5, ge=0, le=1, description="Probability that a sample with Q&A pairs is used as a question instead of a caption."
    )
    qa_turns: int = Field(
        1, ge=1, description="Most Q&A pairs of one image in a question sample, as one dialogue (LLaVA-style): the "
        "drawn question first, then other pairs of the same image, drawn at random, while they fit in max_text_len. "
        "1 = one question per sample.",
    )
    shuffle_buffer: int = Field(256, ge=0, description="Samples held in webdataset's shuffle buffer (0 = no shuffle).")
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes per rank.")
    resampled: bool = Field(
        False, description="Sample shards with replacement forever (no epochs) instead of one pass per epoch."
    )


class TrainConfig(Section):
    seed: int = Field(0, description="Seed for model init, data order and dropout (every rank derives its own from it).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; null = until the epochs are done.")
    epochs: int = Field(1, gt=0, description="Passes over the training shards (ignored when data.resampled).")
    eval_every: int = Field(100, gt=0, description="Run validation every N optimizer steps.")
    eval_batches: int | None = Field(None, gt=0, description="Validation batches per eval; null = the whole split.")
    generate_every: int = Field(
        0, ge=0, description="Every N steps, rank 0 also captions and answers questions on `generate_images` "
        "validation images (greedy) and logs exact match, Q&A accuracy, BLEU/ROUGE-L/CIDEr (0 = off; ZeRO-1/2 only).",
    )
    generate_images: int = Field(16, gt=0, description="Validation images for the in-training generation eval.")
    save_every: int = Field(200, gt=0, description="Save a step checkpoint every N optimizer steps.")
    keep_last: int = Field(3, ge=1, description="Step checkpoints to keep (epoch and best checkpoints are kept apart).")
    keep_epochs: int | None = Field(
        None, ge=1, description="Epoch checkpoints to keep, the newest (null = every one). The demo keeps 2: "
        "its 16 epochs x 96 MB were 1.5 GB of its 1.9 GB run folder.",
    )
    on_nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="A step whose gradients are not finite (on any rank) is never applied: `skip` counts it "
        "and goes on (stopping after `max_skipped_in_a_row` in a row), `stop` ends the run at the first one.",
    )
    max_skipped_in_a_row: int = Field(
        3, gt=0, description="Consecutive skipped (non-finite) steps after which the run stops, naming the first "
        "layer whose gradient went non-finite and the last good checkpoint.",
    )
    stop_signals: list[str] = Field(
        ["SIGTERM", "SIGUSR1", "SIGINT"], description="Signals that make every rank save a checkpoint at the next "
        "step and exit with code 75 (SIGTERM/SIGUSR1: what SLURM and Kubernetes send before killing a job; SIGINT: "
        "Ctrl-C, a second one stops at once). [] = default handling.",
    )

    @field_validator("stop_signals")
    @classmethod
    def _known_signals(cls, names: list[str]) -> list[str]:
        import signal

        bad = [n for n in names if not (n.startswith("SIG") and hasattr(signal, n)) or n in ("SIGKILL", "SIGSTOP")]
        if bad:
            raise ValueError(f"{bad} are not catchable signals; use names such as SIGTERM, SIGUSR1")
        return names


class LogConfig(Section):
    log_every: int = Field(10, gt=0, description="Write train scalars (TensorBoard + metrics.jsonl) every N steps.")
    grad_stats_every: int = Field(50, ge=0, description="Per-layer gradient statistics every N steps (0 = off).")
    histograms_every: int = Field(200, ge=0, description="Weight/gradient histograms every N steps (0 = off).")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under RUN/tb/ (rank 0 only).")
    sample_keys: bool = Field(
        False, description="Every rank appends the keys of the samples of each step to RUN/samples/rank{R}.jsonl "
        "(an audit of the data order: which samples each step saw, across resumes and world-size changes).",
    )
    token_images: int = Field(
        4, ge=0, description="Validation samples (the first of rank 0's val loader) drawn at each eval as token-"
        "comparison images: ground truth vs teacher-forced prediction per head, green right / red wrong.",
    )


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model architecture.")
    data: DataConfig = Field(default_factory=DataConfig, description="Shards and the input pipeline.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training loop.")
    log: LogConfig = Field(default_factory=LogConfig, description="Logging on rank 0.")

    @model_validator(mode="after")
    def _check_lengths(self) -> "RunConfig":
        need = self.model.n_image_tokens + self.data.max_text_len - 1  # the last text token is never an input
        if self.model.max_seq_len < need:
            raise ValueError(
                f"model.max_seq_len={self.model.max_seq_len} < {self.model.n_image_tokens} image tokens + "
                f"data.max_text_len={self.data.max_text_len} - 1 = {need}; raise model.max_seq_len to {need} "
                f"or lower data.max_text_len"
            )
        return self


# Named presets: dicts of overrides on the defaults above (defaults = the seed's `base` model).
PRESETS: dict[str, dict[str, Any]] = {
    # Tests: builds and runs a step in well under a second on one CPU core. Tests also freeze its
    # random tower (--set model.vision.freeze=true), which this preset therefore allows.
    "tiny": {
        "model": {
            "vision": {"model_name": "vlm-tiny-vit", "freeze": False, "allow_random_frozen": True},
            "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 48, "n_future": 2,
        },
        "data": {"max_text_len": 24, "shuffle_buffer": 16, "num_workers": 0},
        "train": {"eval_every": 5, "save_every": 5},
        "log": {"log_every": 1, "grad_stats_every": 2, "histograms_every": 4},
    },
    # The CPU demo: the synthetic shapes task on 2 cores, trained from scratch (no pretrained vision weights
    # offline): a 32 px patch-8 tower (16 image tokens), 4 blocks x 128. What made it learn (tools/run_demo.sh:
    # 4800 images x 16 epochs = 2400 steps, 98 % caption exact match, docs/bench/issue10_round3.md) was steps,
    # not a bigger tower: two-shape scenes need ~1500 steps before the decoder binds attributes to the left /
    # right shape. n_future 1 buys those steps: on this CPU three extra heads cost 2.6x per step, and their
    # drafts speed exact decoding of this small model by only ~1.1x (docs/bench/issue9_round3.md); `base`
    # keeps n_future 4.
    "demo": {
        "model": {
            "vision": {"model_name": "vlm-tiny-vit", "freeze": False},
            "d_model": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 64, "n_future": 1,
            "activation_checkpointing": False,
            # text reads the question before the image: without it, answers about one of two shapes ignored
            # which shape was asked (docs/bench/issue10_round4.md)
            "text_first_layers": 1,
        },
        # two Q&A turns per question sample (32 tokens hold two): colour questions that name one of two shapes by
        # its kind were the last type under 90 % with one (docs/bench/issue10_round6.md)
        "data": {"max_text_len": 32, "shuffle_buffer": 512, "qa_turns": 2},
        "train": {"epochs": 16, "eval_every": 400, "save_every": 400, "generate_every": 400, "generate_images": 32,
                  "keep_epochs": 2},
        "log": {"log_every": 10, "grad_stats_every": 50, "histograms_every": 200},
    },
    # The product model: OpenCLIP ViT-B-32 (frozen, OpenAI weights) + 24 blocks x 8 heads x 768.
    # quick_gelu is set here, not left to the tag, so that the OpenAI weights given as a local file
    # (model.vision.pretrained=/path/to/open_clip_checkpoint) keep the activation they were trained with.
    # compile: regional torch.compile, 0.76x / 0.82x the eager step (checkpointing off / on) at micro-batch 1024
    # on an H100 (docs/bench/gpu_round7.md).
    "base": {
        "model": {"vision": {"model_name": "ViT-B-32", "pretrained": "openai", "freeze": True, "quick_gelu": True},
                  "n_future": 4, "compile": True},
    },
}


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(tree: dict, assignment: str) -> dict:
    """Apply one `section.field=value` override (value parsed as YAML: 4, 1e-3, true, null, [1, 0.5])."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key=value, e.g. model.n_layers=4")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is a value, not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({' '.join(str(err).split())}); "
                          f"quote a string, write a list as [1, 2]") from None
    return tree


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(run config)"
        msg = e["msg"].removeprefix("Value error, ")
        hint = ""
        if e["type"] == "extra_forbidden":
            hint = " (unknown key: check its spelling; `vlm-dist config show` lists every field)"
        lines.append(f"{loc}: {msg}{hint}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(source: str | Path | None = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A preset name or a YAML/JSON file (itself optionally `preset: NAME` + overrides), then overrides."""
    tree: dict[str, Any] = {}
    if source is not None:
        source = str(source)
        if source in PRESETS:
            tree = json.loads(json.dumps(PRESETS[source]))  # deep copy
        else:
            path = Path(source)
            if not path.is_file():
                raise ConfigError(
                    f"config {source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML/JSON file"
                )
            try:
                loaded = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
            preset = loaded.pop("preset", None)
            if preset is not None and preset not in PRESETS:
                raise ConfigError(f"{path}: preset {preset!r} is not one of {', '.join(PRESETS)}")
            tree = _deep_merge(json.loads(json.dumps(PRESETS[preset])) if preset else {}, loaded)
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_config(tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
