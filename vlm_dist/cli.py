"""The `vlm-dist` command: a thin typer layer over the library (each command calls one function).

    vlm-dist --help
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from vlm_dist.devices import CHOICES as DEVICE_CHOICES

app = typer.Typer(
    help="vlm-dist: train, shard data for, export and run a small vision-language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
SPECULATIVE_HELP = ("Greedy decoding drafted by the multi-token heads and verified by the model, a batch in one "
                    "loop: output identical to greedy; needs a model with model.n_future > 1 (base: 4; the demo preset: 1). "
                    "Measured on 2 CPU cores, fp32, the demo recipe trained with n_future 4 "
                    "(docs/bench/issue9_round10.md): 3.47 tokens per call, 1.37x / 1.22x greedy's tokens/s at batch "
                    "1 / 8 on one thread, 1.31x / 1.36x on two (greedy's argmax is certified from a shortlist too, "
                    "so greedy got 4x faster as well); at base width in bf16 (--dtype bf16) its batches project "
                    "to 2.0-2.2x / 1.5-1.6x. "
                    "With --temperature > 0 (generate): speculative sampling, which draws from exactly the model's "
                    "distribution (each draft token kept with probability min(1, p/q), a refused one redrawn from "
                    "the residual; the heads draw from the unembedding's shortlist). On a CPU it is slower than plain "
                    "sampling, which since round 12 mostly skips the whole vocabulary's logits: 0.54x / 0.66x plain "
                    "sampling's tokens/s at batch 1 / 8 on one AVX2 core, a four-head demo model at temperature 0.7 "
                    "(docs/bench/issue9_round12.md); sample without --speculative there.")
DEVICE_HELP = f"Where to decode: {DEVICE_CHOICES}."
DTYPE_HELP = ("Precision to decode in: fp32 (the default: an export, stored in fp32 or bf16, decodes the same on "
              "every machine) or bf16. On a 2-core AMD EPYC with avx512_bf16, one thread, a base-width (24 x 768) "
              "greedy step took 40.5 ms in fp32 and 15.3 ms in bf16 (its weights packed once for oneDNN), a "
              "speculative verify call 65.3 and 20.0 ms, with every argmax row certified as a trained model's are "
              "(docs/bench/issue9_round10.md); at the demo's width (128) fp32 is faster there. On a CPU without "
              "native bf16 (AVX2 only) bf16 is emulated, several times slower: a note says so. A row's bf16 output "
              "can differ with the batch it is decoded in (rounding of batched matmuls), so bf16 eval scores can "
              "move slightly with --batch-size (2 of 40 odd prompts on the demo export; in fp32 a review found none).")
STATIC_HELP = ("Greedy decoding steps of fixed shape (vlm_dist/infer/static.py), replayed as CUDA graphs on a GPU: "
               "the same output; on one H200 at base width, greedy 3.9x / 3.4x and --speculative 2.1x / 2.5x the "
               "tokens/s of the dynamic steps at batch 1 / 8 (docs/bench/gpu_round9.md). Default: static on a GPU, "
               "dynamic on a CPU (no graphs there: static is 0.93-0.99x).")


def _load_for_decoding(model_dir: Path, device: str, dtype: str):
    """An export on --device in --dtype for `generate` and `eval` (raises DeviceError / ExportError)."""
    from vlm_dist.devices import decode_dtype, pick_device
    from vlm_dist.infer.load import load_exported

    where = pick_device(device)
    torch_dtype, note = decode_dtype(dtype, where)
    if note:
        typer.echo(note, err=True)
    return load_exported(model_dir, device=where, dtype=torch_dtype)


def _note_no_drafts(n_future: int) -> None:
    """--speculative on a model without extra heads is plain greedy decoding: say so instead of silently
    reporting 1 token per call."""
    if n_future < 2:
        typer.echo("note: this model has no multi-token heads (model.n_future 1, as the demo preset), so "
                   "--speculative drafts nothing: 1 token per call, greedy's speed; train with --set "
                   "model.n_future=4 for drafts", err=True)


config_app = typer.Typer(help="Inspect run configurations and presets.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    source: str = typer.Argument("tiny", help="A preset (tiny, demo, base) or a YAML/JSON config file."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override, e.g. --set model.n_layers=4 (repeatable)."),
) -> None:
    """Print the fully resolved configuration (YAML), after presets and overrides."""
    import yaml

    from vlm_dist.config import ConfigError, load_config

    try:
        cfg = load_config(source, set_ or [])
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@config_app.command("geometry")
def config_geometry(
    source: str = typer.Argument("tiny", help="A preset (tiny, demo, base) or a YAML/JSON config file."),
    get: Optional[str] = typer.Option(None, "--get", help="Print only this value: image_size, patch_size, width or "
                                      "n_tokens (e.g. shard-coco --resize $(vlm-dist config geometry base --get image_size))."),
) -> None:
    """The vision tower's input geometry (image size, patch size, width, image tokens) of a config."""
    from vlm_dist.config import ConfigError, load_config

    try:
        geometry = load_config(source).model.vision.geometry
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2)
    if get is not None:
        if get not in geometry:
            raise typer.BadParameter(f"one of {', '.join(geometry)}", param_hint="--get")
        typer.echo(geometry[get])
    else:
        typer.echo(" ".join(f"{k}={v}" for k, v in geometry.items()))


@config_app.command("fields")
def config_fields() -> None:
    """List every configuration field with its default and description."""
    from pydantic import BaseModel

    from vlm_dist.config import RunConfig

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            else:
                typer.echo(f"{prefix}{name} = {field.default!r}\n    {field.description}")

    walk(RunConfig, "")


def trainer_argv(*, config: str, overrides: list[str], ds: str, ds_overrides: list[str], run_dir: str,
                 train_shards: str | None, val_shards: str | None, max_steps: int | None, eval_every: int | None,
                 save_every: int | None, resume: str, stop_after: int | None, elastic: bool = False) -> list[str]:
    """The `python -m vlm_dist.train` arguments for the `vlm-dist train` options (one flag each)."""
    argv = ["--config", config, "--ds", ds, "--run-dir", run_dir, "--resume", resume]
    argv += [a for o in overrides for a in ("--set", o)] + [a for o in ds_overrides for a in ("--ds-set", o)]
    for flag, value in [("--train-shards", train_shards), ("--val-shards", val_shards), ("--max-steps", max_steps),
                        ("--eval-every", eval_every), ("--save-every", save_every), ("--stop-after", stop_after)]:
        if value is not None:
            argv += [flag, str(value)]
    return argv + (["--elastic"] if elastic else [])


@app.command("train")
def train_cmd(
    num_gpus: int = typer.Option(1, "--num-gpus", min=1, help="Ranks on this machine: 1 = train in this process; "
                                 "N > 1 = start the DeepSpeed launcher (deepspeed --num_gpus N --module vlm_dist.train), "
                                 "one rank per GPU (CPU ranks on a machine without GPUs). Several machines: launch/."),
    master_port: int = typer.Option(29500, "--master-port", help="Rendezvous port (N > 1); change it to run two jobs "
                                    "on one machine."),
    config: str = typer.Option("demo", "--config", help="Preset (tiny, demo, base) or YAML/JSON run config."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a run-config field, e.g. --set "
                                             "model.n_layers=4 (repeatable; `vlm-dist config fields` lists them)."),
    ds: str = typer.Option("ds_configs/zero2.json", "--ds", help="DeepSpeed JSON: batch sizes, optimizer, schedule, "
                           "precision, ZeRO stage."),
    ds_set: Optional[List[str]] = typer.Option(None, "--ds-set", help="Override a DeepSpeed JSON field, e.g. --ds-set "
                                               "zero_optimization.stage=3 (repeatable)."),
    run_dir: str = typer.Option("runs/default", "--run-dir", help="Holds checkpoints/, tb/, metrics.jsonl, config."),
    train_shards: Optional[str] = typer.Option(None, "--train-shards", help="Training shards: a shard-coco output dir, "
                                               "a folder of webdataset tars (img2dataset), or a brace pattern of tars."),
    val_shards: Optional[str] = typer.Option(None, "--val-shards", help="Validation shards (same forms)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps to run (default: train.epochs worth)."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Save a step checkpoint every N steps."),
    resume: str = typer.Option("auto", "--resume", help="auto (newest complete checkpoint in RUN/checkpoints, if any), "
                               "none, or a checkpoints/tag path."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", min=1, help="End this session after N optimizer steps "
                                             "without changing the LR schedule; a later --resume auto continues."),
    elastic: bool = typer.Option(False, "--elastic", help="Resume a checkpoint made on another number of ranks, "
                                 "exactly (DeepSpeed universal checkpoint; the same data streams and global batch)."),
) -> None:
    """Train the VLM on a DeepSpeed ZeRO engine (the same flags as `python -m vlm_dist.train`).

    Exits 2 with one message on a bad configuration or unavailable pretrained weights.
    """
    import os
    import sys

    argv = trainer_argv(config=config, overrides=set_ or [], ds=ds, ds_overrides=ds_set or [], run_dir=run_dir,
                        train_shards=train_shards, val_shards=val_shards, max_steps=max_steps, eval_every=eval_every,
                        save_every=save_every, resume=resume, stop_after=stop_after, elastic=elastic)
    if num_gpus == 1:
        from vlm_dist.train.entry import main

        raise typer.Exit(main(argv))
    # The launcher sets no OMP_NUM_THREADS: N ranks x all cores each would oversubscribe the CPU.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_gpus)), **os.environ}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus),
           "--master_port", str(master_port), "--module", "vlm_dist.train", *argv]
    # exec: this process becomes DeepSpeed's runner, so a signal to it is a signal to the runner, which the
    # ranks notice (vlm_dist/train/preempt.py): they save and exit 75 instead of training on as orphans.
    os.execve(sys.executable, cmd, env)


@app.command("shard-coco")
def shard_coco_cmd(
    images: Path = typer.Option(..., "--images", help="Folder holding the images the annotations name (COCO 2017: "
                                "train2017/; Karpathy files: the COCO root with train2014/ and val2014/). Files not "
                                "found at the named path are looked up by base name anywhere below it."),
    ann: Optional[List[Path]] = typer.Option(None, "--ann", help="Caption annotations, repeatable: official COCO "
                                             "captions (captions_train2017.json) or LAVIS Karpathy splits "
                                             "(coco_karpathy_train.json); the format is detected from the content."),
    out: Path = typer.Option(..., "--out", help="Output folder for ONE split: {split}-NNNNN.tar, NNNNN_stats.json, "
                             "manifest.json, rejects.jsonl, summary.json. Rerunning into it finishes an interrupted run."),
    vqa_questions: Optional[Path] = typer.Option(None, "--vqa-questions", help="VQA v2 questions file "
                                                 "(v2_OpenEnded_mscoco_*_questions.json); needs --vqa-annotations."),
    vqa_annotations: Optional[Path] = typer.Option(None, "--vqa-annotations", help="VQA v2 answers file "
                                                   "(v2_mscoco_*_annotations.json), joined to the questions on question_id."),
    split: str = typer.Option("train", "--split", help="Split name: the shard prefix ({split}-00000.tar) and the "
                              "manifest's split."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Images planned per shard (a shard is "
                                   "shorter by the images found unreadable)."),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help="Downscale images whose shorter side exceeds "
                                         "N pixels to N (re-encoded as JPEG); default: keep the original bytes."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes writing shards in parallel (one shard each at a time)."),
    verify: str = typer.Option("header", "--verify", help="How each JPEG kept as is gets checked: header (default: "
                               "PIL header + the JPEG marker structure, end-of-image marker included; rejects zero-byte, "
                               "non-image and cut-short files without decoding pixels), full (also decode it at 1/8 "
                               "scale; shard-coco ~3.5x slower), none (PIL header only: truncation goes unnoticed). Converted or "
                               "resized images are always fully decoded."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (stderr)."),
) -> None:
    """Write COCO captions (+ VQA v2 Q&A) as deterministic webdataset tars with a manifest.

    Every caption and question is written or listed in OUT/rejects.jsonl with its reason; the summary
    shows the counts. Exits 2 only when nothing can be written (no readable annotation file, no images).
    """
    from vlm_dist.data.shard import ShardError, format_summary, shard_coco

    if not ann and vqa_questions is None:
        typer.echo("error: give at least one --ann caption file (or --vqa-questions/--vqa-annotations)", err=True)
        raise typer.Exit(2)
    try:
        summary = shard_coco(images, list(ann or []), out, vqa_questions=vqa_questions, vqa_annotations=vqa_annotations,
                             split=split, shard_size=shard_size, resize=resize, workers=workers, verify=verify, progress=progress,
                             log=lambda m: typer.echo(m, err=True))
    except ShardError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(format_summary(summary))
    typer.echo(f"wrote {out}/manifest.json; rejects in {out}/rejects.jsonl")


@app.command("precompute-features")
def precompute_features_cmd(
    shards: str = typer.Option(..., "--shards", help="Image shards: a shard-coco output folder (or a brace pattern / "
                               "glob of its tars)."),
    out: Path = typer.Option(..., "--out", help="Folder for the feature shards (the same tar names) and their manifest."),
    config: str = typer.Option("base", "--config", help="The run config whose frozen tower (model.vision) computes "
                               "the features: the preset or YAML you will train with."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a run-config field, e.g. --set "
                                             "model.vision.pretrained=/path/to/open_clip_checkpoint (repeatable)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per tower forward."),
    workers: int = typer.Option(4, "--workers", min=0, help="Processes decoding JPEGs (0: in this process)."),
    dtype: str = typer.Option("auto", "--dtype", help="Tower precision and stored dtype: auto (bf16 on a GPU with "
                              "bf16, else fp32), bf16, fp16 or fp32. Train in the same precision to feed the "
                              "model what its tower would have computed."),
    device: str = typer.Option("auto", "--device", help=f"Where the tower runs: {DEVICE_CHOICES}."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (stderr)."),
) -> None:
    """Run the frozen vision tower once over image shards and write shards of its output tokens.

    Training on them skips JPEG decoding and the tower's forward every epoch (pass the output folder as
    --train-shards / --val-shards; the trainer checks that the features came from its own tower and
    weights). Only for a frozen tower (model.vision.freeze=true, as in the base preset)."""
    from vlm_dist.config import ConfigError, load_config
    from vlm_dist.data.features import FeatureError, precompute_features
    from vlm_dist.data.manifest import ShardSpecError
    from vlm_dist.devices import DeviceError
    from vlm_dist.model.vision import PretrainedWeightsError

    try:
        cfg = load_config(config, set_ or [])
        summary = precompute_features(shards, out, cfg, batch_size=batch_size, workers=workers, dtype=dtype,
                                      device=device, progress=progress)
    except (ConfigError, DeviceError, FeatureError, ShardSpecError, PretrainedWeightsError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    typer.echo(f"{summary['samples']} samples in {summary['shards']} shard(s), {summary['bytes'] / 2**20:.1f} MiB "
               f"({summary['dtype']} on {summary['device']}, {summary['elapsed_s']:.1f} s); skipped: {skipped}")
    for bad in summary["bad_images"][:5]:
        typer.echo(f"  not decoded: {bad['shard']} {bad['key']}: {bad['error']}", err=True)
    typer.echo(f"wrote {out}/manifest.json and {out}/summary.json")


@app.command("index-shards")
def index_shards_cmd(
    directory: Path = typer.Argument(..., help="A folder of webdataset tars without manifest.json, e.g. img2dataset's "
                                     "output ({key}.jpg/.txt/.json per sample, {shard}_stats.json)."),
    write: bool = typer.Option(True, "--write/--dry-run", help="Write DIRECTORY/manifest.json (else only report)."),
) -> None:
    """Count the usable samples (image + caption) of each tar and write the manifest.json the loader sizes
    epochs from. Samples without an image or a caption are counted by reason and skipped in training.
    (Training also works without this step: the loader then scans the tars at every start.)"""
    import json

    from vlm_dist.data.index import format_index, index_directory
    from vlm_dist.data.manifest import MANIFEST
    from vlm_dist.data.shard import MANIFEST_FORMAT
    from vlm_dist.data.tario import write_json_atomic

    old = directory / MANIFEST
    if old.is_file():
        try:
            fmt = json.loads(old.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt == MANIFEST_FORMAT:
            typer.echo(f"error: {old} was written by shard-coco, which already counted these shards; nothing to do",
                       err=True)
            raise typer.Exit(2)
    try:
        index = index_directory(directory)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(format_index(index))
    if write:
        write_json_atomic(old, index)
        typer.echo(f"wrote {old}")


@app.command("demo-data")
def demo_data_cmd(
    out: Path = typer.Option(..., "--out", help="Folder to write images/{train,val}2017/ and annotations/ into."),
    train: int = typer.Option(2000, "--train", min=1, help="Training images."),
    val: int = typer.Option(200, "--val", min=0, help="Validation images (0 = none)."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same images, captions and questions."),
    image_size: int = typer.Option(64, "--image-size", min=32, help="Side of the square JPEG images, in pixels."),
    shard: bool = typer.Option(False, "--shard/--no-shard", help="Also run shard-coco on each split, into OUT/shards/SPLIT."),
) -> None:
    """Write the synthetic shapes set (COCO captions + VQA v2 files + JPEGs; no download needed).

    Images show one or two shapes (circle/square/triangle, red/green/blue/yellow, small/large,
    left/center/right) with one canonical caption each and one-word-answer questions about them.
    """
    from vlm_dist.data.demo import make_demo_data, shard_command
    from vlm_dist.data.shard import format_summary, shard_coco

    splits = make_demo_data(out, train, val, seed, image_size)
    for name, paths in splits.items():
        typer.echo(f"{name}: {paths['n_images']} images, {paths['n_questions']} questions")
        if shard:
            summary = shard_coco(paths["images"], [paths["captions"]], out / "shards" / name,
                                 vqa_questions=paths["vqa_questions"], vqa_annotations=paths["vqa_annotations"],
                                 split=name, progress=False)
            typer.echo(format_summary(summary))
        else:
            typer.echo(f"  next: {shard_command(out, name, paths)}")


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Option(..., "--ckpt", help="RUN/checkpoints of a training run (any ZeRO stage, any rank count)."),
    out: Path = typer.Option(..., "--out", help="Folder for model.safetensors + config.json."),
    tag: str = typer.Option("latest", "--tag", help="Checkpoint: latest, best, stepN or epochN."),
    dtype: str = typer.Option("fp32", "--dtype", help="Stored precision: fp32 or bf16."),
) -> None:
    """Consolidate a DeepSpeed checkpoint into one safetensors model (verified by reloading it)."""
    from vlm_dist.infer.export import export, resolve_tag
    from vlm_dist.infer.load import ExportError

    if dtype not in ("fp32", "bf16"):
        raise typer.BadParameter("use fp32 or bf16", param_hint="--dtype")
    if out.exists() and not out.is_dir():
        typer.echo(f"error: --out {out} is a file; give a folder (it gets model.safetensors and config.json)", err=True)
        raise typer.Exit(2)
    try:
        tag = resolve_tag(ckpt, tag)  # latest -> the step it names, for the message
        path = export(ckpt, out, tag=tag, dtype=dtype)
    except ExportError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(f"exported {ckpt}/{tag} -> {path}/model.safetensors (verified by a strict reload)")


@app.command("generate")
def generate_cmd(
    model_dir: Path = typer.Option(..., "--model", help="An export folder (from `vlm-dist export`)."),
    image: List[Path] = typer.Option(..., "--image", help="Image file(s); repeat for a batch."),
    question: Optional[str] = typer.Option(None, "--question", help="Ask this about each image (default: caption it)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Longest continuation; lowered (with a "
                                       "note) to what the model's context holds after the image and the prompt."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    speculative: bool = typer.Option(False, "--speculative", help=SPECULATIVE_HELP),
    static: Optional[bool] = typer.Option(None, "--static/--dynamic", help=STATIC_HELP, show_default=False),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
) -> None:
    """Caption images, or answer a question about them (batched, KV-cached decoding)."""
    import json

    import PIL.Image
    import torch

    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.infer.generate import fit_max_new_tokens, generate_text
    from vlm_dist.devices import DeviceError
    from vlm_dist.infer.load import ExportError
    from vlm_dist.text import get_tokenizer, prompt_tokens

    if static and temperature > 0:
        typer.echo("error: --static decodes greedily (fixed-shape greedy steps); sampling takes the dynamic "
                   "path: drop --temperature or drop --static", err=True)
        raise typer.Exit(2)
    if question is not None and not question.strip():
        typer.echo("error: --question is empty: ask something, or leave --question out to caption the images", err=True)
        raise typer.Exit(2)
    try:
        model, cfg = _load_for_decoding(model_dir, device, dtype)
        max_new_tokens, note = fit_max_new_tokens(cfg, len(prompt_tokens(get_tokenizer(), question)), max_new_tokens)
    except (ExportError, DeviceError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    if note:
        typer.echo(note, err=True)
    to_tensor = ImageToTensor(cfg.vision.geometry["image_size"])
    tensors = []
    for path in image:
        try:
            tensors.append(to_tensor(path.read_bytes()))
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as err:  # missing, not an image, too large
            why = str(err).replace("<_io.BytesIO object", "<its bytes")
            typer.echo(f"error: cannot read image {path}: {type(err).__name__}: {why}", err=True)
            raise typer.Exit(2)
    if speculative:
        import time

        from vlm_dist.infer.speculative import format_stats, speculative_generate_batch

        from vlm_dist.infer.spec_sampling import speculative_sample_batch

        _note_no_drafts(cfg.n_future)
        tok = get_tokenizer()
        prompts = [prompt_tokens(tok, question)] * len(image)
        t0 = time.perf_counter()
        if temperature > 0:  # speculative sampling: the model's distribution (static is refused above)
            rows, stats = speculative_sample_batch(model, torch.stack(tensors), prompts, max_new_tokens, temperature,
                                                   top_p, generator=torch.Generator().manual_seed(seed))
        else:
            rows, stats = speculative_generate_batch(model, torch.stack(tensors), prompts, max_new_tokens, static=static)
        typer.echo(format_stats(stats, time.perf_counter() - t0), err=True)
        texts = [tok.decode(ids) for ids in rows]
    else:
        gen = torch.Generator().manual_seed(seed)
        texts = generate_text(model, torch.stack(tensors), [question] * len(image), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, generator=gen, static=static)
    for path, text in zip(image, texts):
        if as_json:
            typer.echo(json.dumps({"image": str(path), "question": question, "text": text}))
        else:
            typer.echo(f"{path}: {text}")


@app.command("eval")
def eval_cmd(
    model_dir: Path = typer.Option(..., "--model", help="An export folder (from `vlm-dist export`)."),
    shards: str = typer.Option(..., "--shards", help="Validation shards: a shard-coco folder or a brace pattern."),
    out: Path = typer.Option(..., "--out", help="JSON file for metrics + predictions (captions also in COCO results format beside it)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Evaluate only the first N images."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Captions / questions decoded per batch."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", min=1, help="Longest generated caption or answer "
                                       "(less where the prompt leaves less room in model.max_seq_len)."),
    speculative: bool = typer.Option(False, "--speculative", help=SPECULATIVE_HELP),
    static: Optional[bool] = typer.Option(None, "--static/--dynamic", help=STATIC_HELP, show_default=False),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("fp32", "--dtype", help=DTYPE_HELP),
) -> None:
    """Caption every image and answer every question; report exact match, VQA accuracy per question type,
    and COCO caption metrics (pycocoevalcap's official pipeline when Java is installed)."""
    from vlm_dist.data.features import FeatureError
    from vlm_dist.data.manifest import ShardSpecError
    from vlm_dist.infer.evaluate import EvalDataError, evaluate_generation, format_metrics, write_results
    from vlm_dist.devices import DeviceError
    from vlm_dist.infer.load import ExportError

    if out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):  # before decoding, not after
        typer.echo(f"error: --out {out}: " + ("is a directory; give a file name, e.g. " + str(out / "eval.json")
                   if out.is_dir() else "a parent of it is a file, not a folder"), err=True)
        raise typer.Exit(2)
    try:
        model, cfg = _load_for_decoding(model_dir, device, dtype)
        if speculative:
            _note_no_drafts(cfg.n_future)
        result = evaluate_generation(model, shards, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     speculative=speculative, static=static)
    except (ExportError, DeviceError, ShardSpecError, EvalDataError, FeatureError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    write_results(result, out)
    typer.echo(format_metrics(result["metrics"]))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
