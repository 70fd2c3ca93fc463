"""The `vlm-dist` command: a thin typer layer over the library (each command calls one function).

    vlm-dist --help
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="vlm-dist: train, shard data for, export and run a small vision-language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
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
                             split=split, shard_size=shard_size, resize=resize, workers=workers, progress=progress,
                             log=lambda m: typer.echo(m, err=True))
    except ShardError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    typer.echo(format_summary(summary))
    typer.echo(f"wrote {out}/manifest.json; rejects in {out}/rejects.jsonl")


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
    from vlm_dist.infer.export import export
    from vlm_dist.infer.load import ExportError

    if dtype not in ("fp32", "bf16"):
        raise typer.BadParameter("use fp32 or bf16", param_hint="--dtype")
    try:
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
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Longest continuation."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    speculative: bool = typer.Option(False, "--speculative", help="Greedy, drafted by the multi-token heads and "
                                     "verified by the model (same output, fewer model calls; one image at a time)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
) -> None:
    """Caption images, or answer a question about them (batched, KV-cached decoding)."""
    import json

    import torch

    from vlm_dist.data.samples import ImageToTensor
    from vlm_dist.infer.generate import generate_text
    from vlm_dist.infer.load import ExportError, load_exported

    try:
        model, cfg = load_exported(model_dir)
    except ExportError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    to_tensor = ImageToTensor(cfg.vision.geometry["image_size"])
    tensors = []
    for path in image:
        try:
            tensors.append(to_tensor(path.read_bytes()))
        except OSError as err:  # missing file, or PIL's UnidentifiedImageError
            typer.echo(f"error: cannot read image {path}: {err}", err=True)
            raise typer.Exit(2)
    if speculative:
        from vlm_dist.infer.speculative import speculative_generate
        from vlm_dist.text import get_tokenizer, prompt_tokens

        if temperature > 0:
            raise typer.BadParameter("self-speculative decoding is greedy: drop --temperature", param_hint="--speculative")
        tok = get_tokenizer()
        texts = [tok.decode(speculative_generate(model, t, prompt_tokens(tok, question), max_new_tokens)[0])
                 for t in tensors]
    else:
        gen = torch.Generator().manual_seed(seed)
        texts = generate_text(model, torch.stack(tensors), [question] * len(image), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, generator=gen)
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
) -> None:
    """Caption every image and answer every question; report exact match, VQA accuracy per question type,
    and COCO caption metrics (pycocoevalcap's official pipeline when Java is installed)."""
    from vlm_dist.data.manifest import ShardSpecError
    from vlm_dist.infer.evaluate import EvalDataError, evaluate_generation, format_metrics, write_results
    from vlm_dist.infer.load import ExportError, load_exported

    try:
        model, _ = load_exported(model_dir)
        result = evaluate_generation(model, shards, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens)
    except (ExportError, ShardSpecError, EvalDataError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    write_results(result, out)
    typer.echo(format_metrics(result["metrics"]))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    app()
