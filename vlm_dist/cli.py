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


if __name__ == "__main__":
    app()
