"""`latentkit methods list`: every registered method, its stages and where it comes from."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Registered methods (built-in and plugins).", no_args_is_help=True)


@app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List methods with their stages and source; one that fails to load is listed with its error."""
    from latentkit.registry import list_methods

    infos = list_methods()
    if as_json:
        rows = [
            {"name": i.name, "stages": list(i.stages), "source": i.source, "error": i.error} for i in infos
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    stages = {i.name: " -> ".join(i.stages) if i.error is None else "-" for i in infos}
    width = max(len("name"), *(len(i.name) for i in infos))
    stage_width = max(len("stages"), *map(len, stages.values()))
    typer.echo(f"{'name':<{width}}  {'stages':<{stage_width}}  source")
    for info in infos:
        broken = "" if info.error is None else f"  error: {info.error}"
        typer.echo(f"{info.name:<{width}}  {stages[info.name]:<{stage_width}}  {info.source}{broken}")
