"""The `openrelease` command line: parse, call one library function, render. Only here we print.

Errors a user can fix print one line and exit 1; usage errors exit 2; tracebacks need
OPENRELEASE_DEBUG=1.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer
import yaml
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from openrelease import __version__
from openrelease.errors import OpenReleaseError
from openrelease.params import STAGES, PipelineParams, StageName, load_params

if TYPE_CHECKING:
    from openrelease.reproduce.run import ReproduceReport

P = ParamSpec("P")
R = TypeVar("R")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="openrelease",
    help="Reproducible, verifiable, MOF-scored open LLM releases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
params_app = typer.Typer(help="Inspect params.yaml.", no_args_is_help=True)
data_app = typer.Typer(help="Run the data stage, or ask which data a step saw.")
app.add_typer(params_app, name="params")
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Params file (a recipe from pipelines/).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
StageOpt = Annotated[StageName, typer.Option("--stage", help="Training stage.")]


def _debug() -> bool:
    return os.environ.get("OPENRELEASE_DEBUG", "") not in ("", "0")


def handles_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn library errors into one line on stderr and exit 1 (traceback with OPENRELEASE_DEBUG)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except OpenReleaseError as exc:
            if _debug():
                raise
            err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # the CLI boundary: a bug must not dump a traceback on users
            if _debug():
                raise
            err.print(
                f"[red]internal error:[/red] {type(exc).__name__}: {exc} "
                "(re-run with OPENRELEASE_DEBUG=1 for the traceback and report it)",
                markup=True,
                highlight=False,
            )
            raise typer.Exit(1) from None

    return wrapper


def _print_json(obj: Any) -> None:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"openrelease {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Reproducible, verifiable, MOF-scored open LLM releases."""
    # Libraries (httpx, huggingface_hub, mlflow) log at WARNING; openrelease's progress at INFO.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("openrelease").setLevel(logging.DEBUG if _debug() else logging.INFO)


# --------------------------------------------------------------------------- params


@params_app.command("show")
@handles_errors
def params_show(params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False) -> None:
    """Print the resolved params (defaults filled in)."""
    resolved = load_params(params).model_dump(mode="json")
    if as_json:
        _print_json(resolved)
    else:
        out.print(yaml.safe_dump(resolved, sort_keys=False), end="", highlight=False)


# --------------------------------------------------------------------------- data


@data_app.callback(invoke_without_command=True)
@handles_errors
def data(ctx: typer.Context, params: ParamsOpt = Path("params.yaml")) -> None:
    """Run the data stage: corpus, tokenizer, packed shards, manifest (DVC stage `data`)."""
    if ctx.invoked_subcommand is not None:
        return
    from openrelease.data.stage import run_data_stage

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


def _open_store(pipeline: PipelineParams) -> Any:
    from openrelease.data.store import DataStore

    return DataStore(Path.cwd() / pipeline.data.out_dir)


@data_app.command("batch")
@handles_errors
def data_batch(
    stage: StageOpt,
    step: Annotated[int, typer.Option("--step", help="Global optimizer step (1-based).")],
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """Print the exact samples (decoded) that global step N of a stage trains on."""
    from openrelease.data.query import batch_at

    pipeline = load_params(params)
    report = batch_at(_open_store(pipeline), pipeline, stage=stage, step=step)
    if as_json:
        _print_json(report)
        return
    out.print(f"{stage} step {step}: order digest {report.order_digest}", highlight=False)
    for sample in report.samples:
        out.rule(f"sample {sample.index}  docs {', '.join(sample.doc_ids)}")
        out.print(sample.text, markup=False, highlight=False)


@data_app.command("where")
@handles_errors
def data_where(
    doc: Annotated[str | None, typer.Option("--doc", help="Document id, e.g. doc-0000012.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Text the document contains.")] = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: JsonOpt = False,
) -> None:
    """List the stages and steps whose batches saw a document."""
    from openrelease.data.query import where_seen

    pipeline = load_params(params)
    report = where_seen(_open_store(pipeline), pipeline, doc_id=doc, text=text)
    if as_json:
        _print_json(report)
        return
    table = Table("document", "stage", "steps")
    for s in report.sightings:
        table.add_row(s.doc_id, s.stage, ", ".join(map(str, s.steps)))
    out.print(table)
    unseen = set(report.doc_ids) - {s.doc_id for s in report.sightings}
    if unseen:
        out.print(f"never trained on: {', '.join(sorted(unseen))}", highlight=False)


# --------------------------------------------------------------------------- summary


@app.command("summary")
@handles_errors
def summary(params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False) -> None:
    """Show what each pipeline stage produced in this workspace and where it is."""
    from openrelease.record.summary import describe_workspace

    report = describe_workspace(Path.cwd(), load_params(params))
    if as_json:
        _print_json(report)
        return
    table = Table("stage", "status", "outputs", "summary", title="openrelease workspace")
    for s in report.stages:
        table.add_row(s.stage, "done" if s.done else "-", s.path, s.summary)
    out.print(table)
    if report.final_metrics:
        keys = sorted({k for m in report.final_metrics.values() for k in m if k != "step"})
        metrics = Table("stage", "step", *keys, title="eval (final checkpoint of each stage)")
        order: dict[str, int] = {name: i for i, name in enumerate(STAGES)}
        for stage, m in sorted(report.final_metrics.items(), key=lambda kv: order.get(kv[0], 99)):
            cells = [f"{m[k]:.4g}" if k in m else "-" for k in keys]
            metrics.add_row(stage, str(int(m.get("step", 0))), *cells)
        out.print(metrics)
    for plot in report.plots:
        out.print(f"plot: {plot}", highlight=False)
    out.print(f"MLflow UI: mlflow ui --backend-store-uri {report.tracking_uri}", highlight=False)


# --------------------------------------------------------------------------- tracking, lineage

tracking_app = typer.Typer(help="The MLflow record.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")


@tracking_app.command("sync")
@handles_errors
def tracking_sync(as_json: JsonOpt = False) -> None:
    """Replay journaled records into MLflow (after an outage); safe to repeat."""
    from openrelease.record.tracking import sync_journals

    report = sync_journals(Path.cwd())
    if as_json:
        _print_json(report)
    else:
        for name, count in report.applied.items():
            out.print(f"{name}: {count} operations applied", highlight=False)
        for name, why in report.failed.items():
            err.print(f"{name}: still failing: {why}", highlight=False)
    if report.failed:
        raise typer.Exit(1)


@tracking_app.command("ui")
@handles_errors
def tracking_ui() -> None:
    """Print the command that opens the MLflow UI on this project's record."""
    from openrelease.record.tracking import redact, tracking_uri

    out.print(f"mlflow ui --backend-store-uri {redact(tracking_uri(Path.cwd()))}", highlight=False)


@app.command("lineage")
@handles_errors
def lineage_cmd(
    target: Annotated[str, typer.Argument(help="Checkpoint folder, stage name, or MLflow run id.")],
    as_json: JsonOpt = False,
    dot: Annotated[bool, typer.Option("--dot", help="Print Graphviz DOT.")] = False,
) -> None:
    """Show exactly what produced a checkpoint: data, params, seed, code, runs, parents."""
    from openrelease.record.lineage import lineage, to_dot

    report = lineage(Path.cwd(), target)
    if as_json:
        _print_json(report)
        return
    if dot:
        sys.stdout.write(to_dot(report))
        return
    table = Table("kind", "name", "digest", "details", title=f"lineage of {target}")
    for node in report.nodes:
        details = "; ".join(f"{k}={v}" for k, v in node.details.items() if v)
        table.add_row(node.kind, node.name, node.digest[:19], details)
    out.print(table)


# --------------------------------------------------------------------------- train, launch


@app.command("train")
@handles_errors
def train_cmd(
    stage: Annotated[StageName, typer.Argument(help="pretrain, sft, distill or grpo.")],
    params: ParamsOpt = Path("params.yaml"),
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the launch command; train nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run one training stage on this process (every rank of a torchrun job calls this)."""
    if dry_run:
        from openrelease.train.launch import launch_command

        argv = launch_command(load_params(params).compute, stage=stage, params_path=str(params))
        if as_json:
            _print_json({"argv": argv})
        else:
            out.print(" ".join(argv), highlight=False)
        return
    from openrelease.train import main_from_cli

    report = main_from_cli(stage, params, Path.cwd())
    if report.rank != 0:
        return
    if as_json:
        _print_json(report)
    else:
        loss = f"{report.final_loss:.4f}" if report.final_loss is not None else "-"
        out.print(
            f"{stage}: steps {report.start_step}->{report.final_step} on {report.world_size} "
            f"process(es) in {report.seconds:.1f}s, loss {loss}, {report.tokens_seen} tokens",
            highlight=False,
        )
    if report.interrupted:
        err.print(f"{stage}: stopped by a signal after saving a resumable state", highlight=False)
        raise typer.Exit(143)


@app.command("launch")
@handles_errors
def launch_cmd(
    stage: Annotated[StageName, typer.Argument(help="pretrain, sft, distill or grpo.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Start a training stage with the launcher params choose (python, torchrun or srun).

    This is what `dvc.yaml` runs; the exit code is the launcher's.
    """
    import subprocess

    from openrelease.train.launch import launch_command

    compute = load_params(params).compute
    argv = launch_command(compute, stage=stage, params_path=str(params))
    if argv[0] == "python":  # the interpreter this CLI runs in, so a venv need not be on PATH
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
    err.print(f"$ {' '.join(argv)}", highlight=False)
    env = {"OMP_NUM_THREADS": str(compute.num_threads), **os.environ}  # the trainer sets threads
    code = subprocess.call(argv, env=env)
    if code != 0:
        raise typer.Exit(code)


# --------------------------------------------------------------------------- eval, plot


@app.command("eval")
@handles_errors
def eval_cmd(params: ParamsOpt = Path("params.yaml"), as_json: JsonOpt = False) -> None:
    """Evaluate every recorded checkpoint not evaluated before (DVC stage `eval`)."""
    from rich.progress import Progress

    from openrelease.eval.stage import run_eval_stage

    pipeline = load_params(params)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=f"evaluating {what}", completed=done - 1, total=total)

        summary = run_eval_stage(pipeline, project_dir=Path.cwd(), progress=progress)
    if as_json:
        _print_json(summary)
        return
    out.print(render_eval_table(summary.results))
    out.print(f"{summary.evaluated} evaluated, {summary.skipped} unchanged", highlight=False)
    for plot in summary.plots:
        out.print(f"plot: {plot}", highlight=False)


def render_eval_table(results: Any) -> Table:
    """A table of the final checkpoint of each stage and its metrics."""
    final: dict[str, Any] = {}
    for r in sorted(results, key=lambda r: r.step):
        final[r.stage] = r
    keys = sorted({k for r in final.values() for k in r.metrics})
    table = Table("stage", "step", *keys, title="eval (final checkpoint of each stage)")
    for stage, r in final.items():
        table.add_row(
            stage, str(r.step), *(f"{r.metrics[k]:.4g}" if k in r.metrics else "-" for k in keys)
        )
    return table


@app.command("plot")
@handles_errors
def plot_cmd(
    root: Annotated[Path, typer.Argument(help="A workspace or a release bundle.")] = Path("."),
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to write PNG and SVG files.")
    ] = None,
) -> None:
    """Regenerate the plots (loss, eval curves, GRPO reward/KL) from a workspace or a bundle."""
    from openrelease.eval.plots import write_plots

    target = out_dir or (root / "artifacts" / "eval" / "plots")
    paths = write_plots(root, out_dir=target)
    if not paths:
        err.print("nothing to plot: no metrics.jsonl or eval results found", highlight=False)
        raise typer.Exit(1)
    for path in paths:
        out.print(f"plot: {path}", highlight=False)


# --------------------------------------------------------------------------- bundle


@app.command("bundle")
@handles_errors
def bundle_cmd(
    project_dir: Annotated[
        Path, typer.Argument(help="The workspace: holds params.yaml and artifacts/.")
    ] = Path("."),
    out_dir: Annotated[
        Path, typer.Option("--out", help="Release folder to write (replaced atomically).")
    ] = Path("release"),
    params: ParamsOpt = Path("params.yaml"),
    certify_replays: Annotated[
        bool,
        typer.Option(
            "--certify",
            help="First replay the last stretch of every stage (last kept state -> next "
            "checkpoint) and ship the result as certificate.json.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Assemble the release folder from the record: MOF 1.0 evidence plus MANIFEST.json."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from openrelease.release.bundle import build_bundle
    from openrelease.release.files import BundleProgress

    pipeline = load_params(project_dir / params if not params.is_absolute() else params)
    if certify_replays:
        from openrelease.release.cards import certificate_lines
        from openrelease.reproduce.run import certify

        certificate = certify(
            project_dir, pipeline, progress=lambda line: err.print(line, highlight=False)
        )
        for line in certificate_lines(certificate):
            err.print(f"certified: {line}", highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
    bar = Progress(
        *columns,
        TextColumn("{task.fields[files]}"),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with bar:
        task = bar.add_task("bundling", total=None, files="")

        def progress(p: BundleProgress) -> None:
            files = f"{p.files_done}/{p.num_files} files" if p.phase == "write" else ""
            what = "hashing training states" if p.phase == "hash" else "writing"
            bar.update(
                task, description=what, completed=p.bytes_done, total=p.num_bytes, files=files
            )

        report = build_bundle(project_dir, out_dir, params=pipeline, progress=progress)
    if as_json:
        _print_json(report)
        return
    out.print(
        f"bundle: {report.num_files} files, {report.num_bytes / 1e6:.1f} MB "
        f"({report.num_linked} hard-linked, {report.bytes_hashed / 1e6:.1f} MB hashed), "
        f"{len(report.components)}/17 MOF components -> {report.out_dir}",
        highlight=False,
    )


# --------------------------------------------------------------------------- reproduce


@app.command("reproduce")
@handles_errors
def reproduce_cmd(
    target: Annotated[
        Path, typer.Argument(help="A workspace (holds artifacts/) or a release bundle folder.")
    ],
    stage: StageOpt,
    from_step: Annotated[
        int | None,
        typer.Option(
            "--from-step",
            help="A step with a kept training state, or 0 (the stage's initial weights); "
            "default: the last state before the final checkpoint.",
        ),
    ] = None,
    to_step: Annotated[
        int | None,
        typer.Option("--to-step", help="The release checkpoint to reproduce; default: the next."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Replay recorded training steps and compare the checkpoint with the record (exit 1: drift)."""
    from openrelease.reproduce.run import reproduce

    report = reproduce(
        target,
        stage=stage,
        from_step=from_step,
        to_step=to_step,
        progress=lambda line: err.print(line, highlight=False),
    )
    if as_json:
        _print_json(report)
    else:
        _print_reproduce(report)
    if not report.identical:
        raise typer.Exit(1)


def _print_reproduce(report: ReproduceReport) -> None:
    verdict = "[green]identical[/green]" if report.identical else "[red]drift[/red]"
    out.print(
        f"{report.stage} steps {report.from_step}..{report.to_step} of {report.target}: {verdict}",
        highlight=False,
    )
    weights = report.weights()
    out.print(f"  model.safetensors recorded {weights.recorded}", highlight=False)
    out.print(f"  model.safetensors replayed {weights.replayed}", highlight=False)
    out.print(
        f"  recorded on {report.world_size} process(es), {report.device}; replayed on "
        f"{report.replay_world_size} process(es), {report.replay_device} "
        f"in {report.seconds:.1f} s",
        highlight=False,
    )
    for note in report.notes:
        out.print(f"  [yellow]note:[/yellow] {note}", highlight=False)
    if report.identical:
        return
    files = Table("file", "recorded", "on disk", "replayed")
    for f in (f for f in report.files if not f.same):
        files.add_row(f.path, *((h or "-")[:23] for h in (f.recorded, f.found, f.replayed)))
    out.print(files)
    moved = [d for d in report.drift if d.max_abs_delta != 0.0]
    drift = sorted(moved, key=lambda d: (d.max_abs_delta is not None, -(d.max_abs_delta or 0)))
    tensors = Table("tensor", "max |delta|", "note")
    for d in drift[:20]:
        delta = "-" if d.max_abs_delta is None else f"{d.max_abs_delta:.3g}"
        tensors.add_row(d.name, delta, d.note)
    out.print(tensors if drift else "  every tensor is equal; only other files differ")
    losses = Table("step", "recorded loss", "replayed loss")
    for p in report.losses:
        losses.add_row(
            str(p.step), *("-" if v is None else f"{v:.6f}" for v in (p.recorded, p.replayed))
        )
    out.print(losses)


# --------------------------------------------------------------------------- verify, audit, publish

EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co).")
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch or tag.")]


class MofClassName(StrEnum):
    """A MOF class on the command line (I is the most open)."""

    I = "I"  # noqa: E741 - the MOF's own name for the class
    II = "II"
    III = "III"

    @property
    def number(self) -> int:
        """1, 2 or 3."""
        return {"I": 1, "II": 2, "III": 3}[self.value]


def _byte_progress(label: str) -> tuple[Any, Callable[[int, int], None]]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task = bar.add_task(label, total=None)

    def tick(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, tick


def render_verify_report(report: Any) -> None:
    """Print a verify report: counts, then every difference and problem."""
    status = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    out.print(
        f"verify {report.target}: {status} ({report.num_files} files, "
        f"{report.num_bytes / 1e6:.1f} MB checked)",
        highlight=False,
    )
    for label, paths in (
        ("missing", report.missing),
        ("changed", report.changed),
        ("extra", report.extra),
    ):
        for path in paths[:50]:
            out.print(f"  {label}: {path}", markup=False, highlight=False)
        if len(paths) > 50:
            out.print(f"  ... and {len(paths) - 50} more {label}", highlight=False)
    for key in report.signed_by:
        out.print(f"  signed by {key}", highlight=False)
    for p in report.problems:
        out.print(f"  {p.severity}: [{p.code}] {p.path or '-'}: {p.message}", markup=False)


@app.command("keygen")
@handles_errors
def keygen_cmd(
    key: Annotated[Path, typer.Argument(help="Private key file to create (PEM, mode 600).")],
) -> None:
    """Create an Ed25519 key pair for signing releases (KEY and KEY.pub)."""
    from openrelease.verify.signing import generate_key

    pub, kid = generate_key(key)
    out.print(f"private key: {key}\npublic key:  {pub}\nkey id:      {kid}", highlight=False)


@app.command("sign")
@handles_errors
def sign_cmd(
    bundle: Annotated[Path, typer.Argument(help="The release folder to sign.")],
    key: Annotated[Path, typer.Option("--key", help="Ed25519 private key (openrelease keygen).")],
    as_json: JsonOpt = False,
) -> None:
    """Verify a release, then sign its MANIFEST.json (signatures/<key id>.sig.json)."""
    from openrelease.verify.bundle import verify_bundle
    from openrelease.verify.signing import sign_bundle

    report = verify_bundle(bundle)
    if not report.ok:
        render_verify_report(report)
        err.print(f"{bundle} does not verify; not signed", highlight=False)
        raise typer.Exit(1)
    path, sig = sign_bundle(bundle, key)
    if as_json:
        _print_json(sig)
    else:
        out.print(f"signed {bundle}/MANIFEST.json with {sig.key_id} -> {path}", highlight=False)


@app.command("verify")
@handles_errors
def verify_cmd(
    target: Annotated[
        str, typer.Argument(help="A release folder, or hf:ORG/NAME for a published release.")
    ],
    as_json: JsonOpt = False,
    revision: RevisionOpt = None,
    endpoint: EndpointOpt = None,
    num_threads: Annotated[
        int | None, typer.Option("--num-threads", min=1, help="Hashing threads (default: CPUs).")
    ] = None,
    trusted_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--trusted-key",
            help="Ed25519 public key (.pub); require a valid signature by it. Repeatable.",
        ),
    ] = None,
) -> None:
    """Check that a release is exactly what its MANIFEST.json says (exit 1 when not)."""
    if target.startswith("hf:"):
        from openrelease.verify.hub import verify_hub

        if trusted_key:
            err.print("--trusted-key checks a local bundle; download it first", highlight=False)
            raise typer.Exit(2)

        with err.status(f"reading {target}"):
            report = verify_hub(target[3:], endpoint=endpoint, revision=revision)
    else:
        from openrelease.verify.bundle import verify_bundle

        bar, tick = _byte_progress("hashing")
        with bar:
            report = verify_bundle(
                Path(target), progress=tick, num_threads=num_threads, trusted_keys=trusted_key
            )
    if as_json:
        _print_json(report)
    else:
        render_verify_report(report)
    if not report.ok:
        raise typer.Exit(1)


def render_audit_table(report: Any) -> Table:
    """The audit as a table: one row per MOF component."""
    from openrelease.audit.report import ROMAN

    title = f"MOF audit of {report.target}: "
    title += (
        report.verified.label
        if report.verified
        else (report.claimed.label if report.claimed else "unclassified")
    )
    table = Table("component", "class", "claimed", "verified", "license", "evidence", title=title)
    for r in report.rows:
        more = f" (+{r.num_evidence - 1})" if r.num_evidence > 1 else ""
        evidence = (r.evidence[0] + more) if r.evidence else (r.problem or "")
        verified = r.verified_status or ("-" if r.verified is None else "missing")
        table.add_row(
            r.component,
            ROMAN[r.mof_class],
            r.claimed_status or "-",
            verified,
            r.license or "",
            evidence,
        )
    return table


@app.command("audit")
@handles_errors
def audit_cmd(
    target: Annotated[
        str, typer.Argument(help="A release folder, a MOT YAML file, or a Hub repo ORG/NAME.")
    ],
    as_json: JsonOpt = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown.")] = False,
    write_mof: Annotated[
        Path | None, typer.Option("--write-mof", help="Write the verified components as MOT YAML.")
    ] = None,
    require_class: Annotated[
        MofClassName | None,
        typer.Option("--require-class", help="Exit 1 unless the release is this class or better."),
    ] = None,
    endpoint: EndpointOpt = None,
    revision: RevisionOpt = None,
    no_hashes: Annotated[
        bool, typer.Option("--no-hashes", help="Skip hashing weights (faster, less certain).")
    ] = False,
) -> None:
    """Score a release's MOF openness class from its evidence, not only its claims."""
    from openrelease.audit.report import audit
    from openrelease.manifest import write_text_atomic

    with err.status(f"auditing {target}"):
        report = audit(target, endpoint=endpoint, revision=revision, check_hashes=not no_hashes)
    if write_mof is not None:
        write_text_atomic(write_mof, report.to_mof_yaml())
    if as_json:
        _print_json(report)
    elif markdown:
        sys.stdout.write(report.to_markdown())
    else:
        out.print(render_audit_table(report))
        for p in report.problems:
            out.print(f"{p.severity}: {p.path or '-'}: {p.message}", markup=False)
    if require_class is not None and not report.meets(require_class.number):
        err.print(
            f"{target}: MOF class {report.mof_class or 'none'} does not meet Class "
            f"{require_class.value}",
            highlight=False,
        )
        raise typer.Exit(1)


@app.command("publish")
@handles_errors
def publish_cmd(
    bundle: Annotated[Path, typer.Argument(help="The release folder to publish.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="ORG/NAME of the model repo.")],
    endpoint: EndpointOpt = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Tag for main (default: release-<digest>).")
    ] = None,
    require_class: Annotated[
        MofClassName | None,
        typer.Option("--require-class", help="Refuse unless the audit reaches this class."),
    ] = None,
    private: Annotated[bool, typer.Option("--private", help="Create new repos private.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be uploaded; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish a verified release to the Hugging Face Hub (checkpoints as branches, data repo)."""
    from openrelease.release.publish import publish_bundle
    from openrelease.verify.bundle import verify_bundle

    verified: dict[Path, Any] = {}

    def verify_once(path: Path) -> Any:  # the plan and the publish share one hashing pass
        if path not in verified:
            verified[path] = verify_bundle(path)
        return verified[path]

    if not (dry_run or yes or as_json):
        plan = publish_bundle(
            bundle,
            repo_id=repo_id,
            endpoint=endpoint,
            dry_run=True,
            verify=verify_once,
            require_class=require_class.number if require_class else None,
        )
        _render_publish(plan)
        if not typer.confirm("publish?", err=True):
            raise typer.Exit(1)
    bar, tick = _byte_progress("uploading")
    with bar:
        report = publish_bundle(
            bundle,
            repo_id=repo_id,
            endpoint=endpoint,
            private=private,
            revision_tag=tag,
            dry_run=dry_run,
            verify=verify_once,
            require_class=require_class.number if require_class else None,
            progress=tick,
        )
    if as_json:
        _print_json(report)
    else:
        _render_publish(report)
    if not dry_run and not report.ok:  # a dry run's plan lists what is not there yet
        raise typer.Exit(1)


def _render_publish(report: Any) -> None:
    verb = "would upload" if report.dry_run else "uploaded"
    table = Table("repo", "revision", "files", verb, "MB", title=f"publish to {report.endpoint}")
    for t in report.targets:
        new = " (new)" if t.created else ""
        table.add_row(
            f"{t.repo_type}:{t.repo_id}",
            t.revision + new,
            str(t.num_files),
            str(len(t.uploaded)),
            f"{t.num_uploaded_bytes / 1e6:.1f}",
        )
    out.print(table)
    out.print(f"tag: {report.tag}", highlight=False)
    for label, paths in (("missing", report.missing), ("mismatched", report.mismatched)):
        for path in paths:
            out.print(f"  {label}: {path}", markup=False, highlight=False)


def main() -> None:
    """Console-script entry point."""
    app()
