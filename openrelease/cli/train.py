"""Commands that train, evaluate and replay: train, launch, eval, plot, reproduce."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from openrelease import layout
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
from openrelease.params import StageName, load_params

if TYPE_CHECKING:
    from rich.progress import Progress

    from openrelease.manifest import EvalResult
    from openrelease.reproduce.run import ReproduceReport


# --------------------------------------------------------------------------- train, launch


@app.command("train")
def train_cmd(
    stage: Annotated[StageName, typer.Argument(help="A training stage of params `stages`.")],
    params: ParamsOpt = DEFAULT_PARAMS,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the launch command; train nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run one training stage on this process (every rank of a torchrun job calls this)."""
    if dry_run:
        from openrelease.train.launch import determinism_env, launch_command

        compute = load_params(params).compute
        argv = launch_command(compute, stage=stage, params_path=str(params))
        pins = determinism_env(compute)
        if as_json:
            print_json({"argv": argv, "env": pins})
        else:
            out.print(" ".join([*(f"{k}={v}" for k, v in pins.items()), *argv]), highlight=False)
        return
    from openrelease.train.launch import pin_environment

    pin_environment(load_params(params).compute)  # before torch starts (import below)
    from openrelease.train import main_from_cli

    report = main_from_cli(stage, params, Path.cwd())
    if report.rank != 0:
        return
    if as_json:
        print_json(report)
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
def launch_cmd(
    stage: Annotated[StageName, typer.Argument(help="A training stage of params `stages`.")],
    params: ParamsOpt = DEFAULT_PARAMS,
    kind: Annotated[
        str | None, typer.Option("--kind", help="The stage's kind, as dvc.yaml names it.")
    ] = None,
) -> None:
    """Start a training stage with the launcher params choose (python, torchrun or srun).

    This is what `dvc.yaml` runs; the exit code is the launcher's. A recorder process beside
    the trainer sends the stage's journal to MLflow (the trainer never imports mlflow).
    """
    from openrelease.errors import ParamsError
    from openrelease.record.recorder import run_recorded
    from openrelease.record.tracking import stage_run_key, tracking_uri
    from openrelease.train.launch import determinism_env, launch_command, launch_env

    check_before_stage(params)
    pipeline = load_params(params)
    if kind is not None and pipeline.spec(stage).kind != kind:
        raise ParamsError(
            f"dvc.yaml runs {stage} as kind {kind}, params.yaml says "
            f"{pipeline.spec(stage).kind}; run `openrelease pipeline sync`."
        )
    compute = pipeline.compute
    argv = launch_command(compute, stage=stage, params_path=str(params), resolve=True)
    pins = " ".join(f"{k}={v}" for k, v in determinism_env(compute).items())
    err.print(f"$ {pins + ' ' if pins else ''}{' '.join(argv)}", highlight=False)
    project = Path.cwd()
    code = run_recorded(  # the trainer journals; a recorder process beside it sends to MLflow
        argv,
        env=launch_env(compute),  # the determinism pins reach every rank before torch starts
        project_dir=project,
        run_key=stage_run_key(project, pipeline, stage),
        tracking_uri=tracking_uri(project),
        record_path=layout.Workspace(project).record(stage),
    )
    if code != 0:
        raise typer.Exit(code)


# --------------------------------------------------------------------------- eval, plot


CheckpointDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="Score this transformers checkpoint folder with lm-eval instead of running the stage.",
    ),
]
TaskOpt = Annotated[
    list[str] | None,
    typer.Option("--task", help="lm-eval task or group (repeatable); needs --checkpoint."),
]
IncludePathOpt = Annotated[
    Path | None, typer.Option("--include-path", help="A folder of lm-eval task YAMLs.")
]


@app.command("eval")
def eval_cmd(
    params: ParamsOpt = DEFAULT_PARAMS,
    checkpoint: CheckpointDirOpt = None,
    task: TaskOpt = None,
    include_path: IncludePathOpt = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", min=0, help="n-shot (default: the task's).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Score the first N documents per task.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="lm-eval batch.")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate every recorded checkpoint not evaluated before (DVC stage `eval`).

    With --checkpoint DIR --task NAME, score one checkpoint with lm-evaluation-harness instead.
    """
    if checkpoint is not None or task:
        _score_one(checkpoint, task or [], include_path, num_fewshot, limit, batch_size, as_json)
        return
    from openrelease.train.launch import pin_environment

    check_before_stage(params)
    pipeline = load_params(params)
    pin_environment(pipeline.compute)  # greedy decoding is numerics too: same kernels as training
    from openrelease.eval.stage import run_eval_stage

    bar, progress = _eval_progress()
    with bar, redirect_stdout(sys.stderr):  # lm-eval prints progress on stdout
        summary = run_eval_stage(
            pipeline,
            project_dir=Path.cwd(),
            progress=progress,
            log_every_s=None if err.is_terminal else HEARTBEAT_S,
        )
    if as_json:
        print_json(summary)
        return
    out.print(render_eval_table(summary.results))
    out.print(f"{summary.evaluated} evaluated, {summary.skipped} unchanged", highlight=False)
    for plot in summary.plots:
        out.print(f"plot: {plot}", highlight=False)


HEARTBEAT_S = 20.0
"""Off a terminal, the eval stage logs a line at least this often (the goal is 30 s)."""


def _eval_progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    """A checkpoint bar on stderr, hidden off a terminal (the stage logs lines there)."""
    from rich.progress import Progress, TimeElapsedColumn

    bar = Progress(
        *Progress.get_default_columns(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task = bar.add_task("evaluating", total=None)

    def progress(what: str, done: int, total: int) -> None:
        bar.update(task, description=f"evaluating {what}", completed=done - 1, total=total)

    return bar, progress


def _score_one(
    checkpoint: Path | None,
    tasks: list[str],
    include_path: Path | None,
    num_fewshot: int | None,
    limit: int | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """`openrelease eval --checkpoint DIR --task NAME`: lm-eval on one checkpoint folder."""
    from openrelease.eval.harness import metric_name, score_checkpoint
    from openrelease.params import LmEvalParams

    if checkpoint is None or not tasks:
        raise typer.BadParameter("--checkpoint DIR and --task NAME go together; give both.")
    settings = LmEvalParams(
        tasks=tuple(tasks), num_fewshot=num_fewshot, limit=limit, batch_size=batch_size
    )
    # lm-eval prints progress (e.g. "bootstrapping for stddev") on stdout: keep stdout for results.
    with err.status(f"lm-eval: {', '.join(tasks)} on {checkpoint}"), redirect_stdout(sys.stderr):
        record = score_checkpoint(checkpoint, settings, include_path=include_path)
    if as_json:
        print_json(record)
        return
    table = Table("task", "metric", "value", "stderr", "n-shot", "samples", "config hash")
    for name, r in record.tasks.items():
        for key, value in r.scores.items():
            if "_stderr" in key:
                continue
            stderr = r.scores.get(key.replace(",", "_stderr,", 1))
            table.add_row(
                name,
                metric_name(key),
                f"{value:.4f}",
                f"{stderr:.4f}" if stderr is not None else "-",
                str(r.num_fewshot),
                str(r.num_samples),
                (r.config_hash or "-")[:19],
            )
    table.title = f"lm-evaluation-harness {record.harness_version}, seed {record.seed}"
    out.print(table)


def render_eval_table(results: Iterable[EvalResult]) -> Table:
    """A table of the final checkpoint of each stage and its metrics."""
    final: dict[str, EvalResult] = {}
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
def plot_cmd(
    root: Annotated[Path, typer.Argument(help="A workspace or a release bundle.")] = Path("."),
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write PNG and SVG files (default: the workspace's artifacts/eval/"
            "plots, or plots/ here for a bundle; never inside a bundle).",
        ),
    ] = None,
) -> None:
    """Regenerate the plots (loss, eval curves, GRPO reward/KL) from a workspace or a bundle."""
    from openrelease.eval.plots import default_out_dir, write_plots

    paths = write_plots(root, out_dir=out_dir or default_out_dir(root))
    if not paths:
        err.print("nothing to plot: no metrics.jsonl or eval results found", highlight=False)
        raise typer.Exit(1)
    for path in paths:
        out.print(f"plot: {path}", highlight=False)


# --------------------------------------------------------------------------- reproduce


@app.command("reproduce")
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
        print_json(report)
    else:
        _print_reproduce(report)
    if not report.identical:
        raise typer.Exit(1)


def _print_reproduce(report: ReproduceReport) -> None:
    verdict = "[green]identical[/green]" if report.identical else "[red]drift[/red]"
    out.print(
        f"{report.stage} steps {report.from_step}..{report.to_step} of "
        f"{escape(report.target)}: {verdict}",
        markup=True,
    )
    weights = report.weights()
    out.print(f"  {layout.WEIGHTS} recorded {weights.recorded}", highlight=False)
    out.print(f"  {layout.WEIGHTS} replayed {weights.replayed}", highlight=False)
    out.print(
        f"  recorded on {report.world_size} process(es), {report.device}; replayed on "
        f"{report.replay_world_size} process(es), {report.replay_device} "
        f"in {report.seconds:.1f} s",
        highlight=False,
    )
    for note in report.notes:
        out.print(f"  [yellow]note:[/yellow] {escape(note)}", markup=True)
    if report.fingerprint_differences:
        hosts = Table("fingerprint", "recorded", "replaying host", "can explain drift")
        for fd in report.fingerprint_differences:
            hosts.add_row(
                fd.key, fd.recorded or "-", fd.replayed or "-", "yes" if fd.explains else "no"
            )
        out.print(hosts)
    if report.explanation:
        out.print(f"  [yellow]why:[/yellow] {escape(report.explanation)}", markup=True)
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
