"""Commands that create and keep a release project: init, pipeline sync, pipeline check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from openrelease.cli.app import DEFAULT_PARAMS, ParamsOpt, app, out
from openrelease.params import load_params

pipeline_app = typer.Typer(
    help="The project's DVC pipeline: dvc.yaml generated from params.yaml.", no_args_is_help=True
)
app.add_typer(pipeline_app, name="pipeline")


@app.command("init")
def init_cmd(
    directory: Annotated[Path, typer.Argument(help="The new project folder (new or empty).")],
    recipe: Annotated[
        str, typer.Option("--recipe", help="Params recipe: tiny, gpu-1b, moxin-7b-multinode.")
    ] = "tiny",
) -> None:
    """Create a standalone git + DVC project for your own release."""
    from openrelease.pipeline import init_project

    files = init_project(directory, recipe)
    out.print(f"created {directory} ({recipe}): {', '.join(sorted(files))}", highlight=False)
    out.print(
        f"next: cd {directory} && git add -A && git commit -m 'release project' && dvc repro",
        highlight=False,
    )


@pipeline_app.command("sync")
def pipeline_sync(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Write dvc.yaml (and .openrelease/code.json) from params.yaml and the installed code."""
    from openrelease.pipeline import sync_pipeline

    project = params.resolve().parent
    changed = sync_pipeline(project, load_params(params))
    out.print(
        f"updated {', '.join(changed)}" if changed else "dvc.yaml is up to date", highlight=False
    )


@pipeline_app.command("check")
def pipeline_check(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Exit 1 with one line when dvc.yaml, params.yaml and the installed code disagree."""
    from openrelease.pipeline import check_pipeline

    check_pipeline(params.resolve().parent, load_params(params))
    out.print("dvc.yaml matches params.yaml and the installed openrelease", highlight=False)
