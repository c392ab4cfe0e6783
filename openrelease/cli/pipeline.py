"""Commands on a workspace's pipeline and record: params, data, summary, lineage, tracking."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
import yaml
from rich.table import Table

from openrelease.cli.app import (
    DEFAULT_PARAMS,
    JsonOpt,
    ParamsOpt,
    StageOpt,
    app,
    check_before_stage,
    err,
    out,
    print_json,
)
from openrelease.params import PipelineParams, load_params

if TYPE_CHECKING:
    from openrelease.data.store import DataStore

params_app = typer.Typer(help="Inspect params.yaml.", no_args_is_help=True)
data_app = typer.Typer(help="Run the data stage, or ask which data a step saw.")
tracking_app = typer.Typer(help="The MLflow record.", no_args_is_help=True)
app.add_typer(params_app, name="params")
app.add_typer(data_app, name="data")
app.add_typer(tracking_app, name="tracking")


# --------------------------------------------------------------------------- params


@params_app.command("show")
def params_show(params: ParamsOpt = DEFAULT_PARAMS, as_json: JsonOpt = False) -> None:
    """Print the resolved params (defaults filled in)."""
    resolved = load_params(params).model_dump(mode="json")
    if as_json:
        print_json(resolved)
    else:
        out.print(yaml.safe_dump(resolved, sort_keys=False), end="", highlight=False)


# --------------------------------------------------------------------------- data


@data_app.callback(invoke_without_command=True)
def data(ctx: typer.Context, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Run the data stage: corpus, tokenizer, packed shards, manifest (DVC stage `data`)."""
    if ctx.invoked_subcommand is not None:
        return
    from openrelease.data.stage import run_data_stage

    check_before_stage(params)
    pipeline = load_params(params)
    with err.status("data stage") as status:
        manifest = run_data_stage(
            pipeline,
            project_dir=Path.cwd(),
            progress=lambda msg: status.update(f"data stage: {msg}"),
        )
    out.print(
        f"data: {manifest.num_pretrain_seqs} sequences, {manifest.num_pretrain_tokens} tokens, "
        f"vocab {manifest.vocab_size} -> {pipeline.data.out_dir} ({manifest.data_digest[:19]})",
        highlight=False,
    )


def _open_store(pipeline: PipelineParams) -> DataStore:
    from openrelease.data.store import DataStore

    return DataStore(Path.cwd() / pipeline.data.out_dir)


@data_app.command("batch")
def data_batch(
    stage: StageOpt,
    step: Annotated[int, typer.Option("--step", help="Global optimizer step (1-based).")],
    params: ParamsOpt = DEFAULT_PARAMS,
    as_json: JsonOpt = False,
) -> None:
    """Print the exact samples (decoded) that global step N of a stage trains on."""
    from openrelease.data.query import batch_at

    pipeline = load_params(params)
    report = batch_at(_open_store(pipeline), pipeline, stage=stage, step=step)
    if as_json:
        print_json(report)
        return
    out.print(f"{stage} step {step}: order digest {report.order_digest}", highlight=False)
    for sample in report.samples:
        sources = sorted(set(sample.sources))
        tagged = [f"{s} ({report.licenses.get(s) or 'license not stated'})" for s in sources]
        out.rule(
            f"sample {sample.index}  docs {', '.join(sample.doc_ids)}  from {'; '.join(tagged)}"
        )
        out.print(sample.text, markup=False, highlight=False)


@data_app.command("where")
def data_where(
    doc: Annotated[str | None, typer.Option("--doc", help="Document id, e.g. doc-0000012.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Text the document contains.")] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="At most this many --text matches.")
    ] = 50,
    params: ParamsOpt = DEFAULT_PARAMS,
    as_json: JsonOpt = False,
) -> None:
    """List the stages and steps whose batches saw a document."""
    from openrelease.data.query import where_seen

    pipeline = load_params(params)
    report = where_seen(_open_store(pipeline), pipeline, doc_id=doc, text=text, limit=limit)
    if as_json:
        print_json(report)
        return
    table = Table("document", "stage", "steps")
    for s in report.sightings:
        table.add_row(s.doc_id, s.stage, ", ".join(map(str, s.steps)))
    out.print(table)
    unseen = set(report.doc_ids) - {s.doc_id for s in report.sightings}
    if unseen:
        out.print(f"never trained on: {', '.join(sorted(unseen))}", highlight=False)
    if report.truncated:
        out.print(
            f"showing the first {len(report.doc_ids)} of {report.total_matches} matching "
            "documents; raise --limit to see more",
            highlight=False,
        )


@data_app.command("export")
def data_export(
    stage: StageOpt,
    from_step: Annotated[int, typer.Option("--from-step", help="First global step (1-based).")],
    to_step: Annotated[int, typer.Option("--to-step", help="Last global step (inclusive).")],
    out_dir: Annotated[Path, typer.Option("--out", help="New folder for the export.")],
    params: ParamsOpt = DEFAULT_PARAMS,
    as_json: JsonOpt = False,
) -> None:
    """Write the exact token sequences (and doc ids, sources) a stage trained on in A..B."""
    from openrelease.train.export import export_steps

    pipeline = load_params(params)
    report = export_steps(
        pipeline,
        project_dir=Path.cwd(),
        stage=stage,
        from_step=from_step,
        to_step=to_step,
        out_dir=out_dir,
    )
    if as_json:
        print_json(report)
        return
    out.print(
        f"{stage} steps {from_step}..{to_step}: {report.num_samples} samples, "
        f"{report.num_tokens} tokens -> {out_dir}; order digest {report.order_digest}",
        highlight=False,
    )


# --------------------------------------------------------------------------- summary, lineage


@app.command("summary")
def summary(params: ParamsOpt = DEFAULT_PARAMS, as_json: JsonOpt = False) -> None:
    """Show what each pipeline stage produced in this workspace and where it is."""
    from openrelease.record.summary import describe_workspace

    pipeline = load_params(params)
    report = describe_workspace(Path.cwd(), pipeline)
    if as_json:
        print_json(report)
        return
    table = Table("stage", "status", "outputs", "summary", title="openrelease workspace")
    for s in report.stages:
        table.add_row(s.stage, "done" if s.done else "-", s.path, s.summary)
    out.print(table)
    if report.final_metrics:
        keys = sorted({k for m in report.final_metrics.values() for k in m if k != "step"})
        metrics = Table("stage", "step", *keys, title="eval (final checkpoint of each stage)")
        order: dict[str, int] = {name: i for i, name in enumerate(pipeline.train_stages)}
        for stage, m in sorted(report.final_metrics.items(), key=lambda kv: order.get(kv[0], 99)):
            cells = [f"{m[k]:.4g}" if k in m else "-" for k in keys]
            metrics.add_row(stage, str(int(m.get("step", 0))), *cells)
        out.print(metrics)
    for plot in report.plots:
        out.print(f"plot: {plot}", highlight=False)
    out.print(f"MLflow UI: mlflow ui --backend-store-uri {report.tracking_uri}", highlight=False)


@app.command("lineage")
def lineage_cmd(
    target: Annotated[str, typer.Argument(help="Checkpoint folder, stage name, or MLflow run id.")],
    as_json: JsonOpt = False,
    dot: Annotated[bool, typer.Option("--dot", help="Print Graphviz DOT.")] = False,
) -> None:
    """Show exactly what produced a checkpoint: data, params, seed, code, runs, parents."""
    from openrelease.record.lineage import lineage, to_dot

    report = lineage(Path.cwd(), target)
    if as_json:
        print_json(report)
        return
    if dot:
        sys.stdout.write(to_dot(report))
        return
    table = Table("kind", "name", "digest", "details", title=f"lineage of {target}")
    for node in report.nodes:
        details = "; ".join(f"{k}={v}" for k, v in node.details.items() if v)
        table.add_row(node.kind, node.name, node.digest[:19], details)
    out.print(table)


# --------------------------------------------------------------------------- tracking


@tracking_app.command("sync")
def tracking_sync(as_json: JsonOpt = False) -> None:
    """Replay journaled records into MLflow (after an outage); safe to repeat."""
    from openrelease.record.tracking import sync_journals

    report = sync_journals(Path.cwd())
    if as_json:
        print_json(report)
    else:
        for name, count in report.applied.items():
            out.print(f"{name}: {count} operations applied", highlight=False)
        for name, why in report.failed.items():
            err.print(f"{name}: still failing: {why}", highlight=False)
    if report.failed:
        raise typer.Exit(1)


@tracking_app.command("ui")
def tracking_ui() -> None:
    """Print the command that opens the MLflow UI on this project's record."""
    from openrelease.record.tracking import ui_uri

    out.print(f"mlflow ui --backend-store-uri {ui_uri(Path.cwd())}", highlight=False)
