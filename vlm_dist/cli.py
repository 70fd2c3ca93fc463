"""The `vlm-dist` command: a thin typer layer over the library (each command calls one function).

    vlm-dist --help
"""

from __future__ import annotations

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


if __name__ == "__main__":
    app()
