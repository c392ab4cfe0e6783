"""Commands that make and ship a release: bundle, keygen, sign, publish."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from openrelease import layout
from openrelease.cli.app import (
    DEFAULT_PARAMS,
    EndpointOpt,
    JsonOpt,
    MofClassName,
    ParamsOpt,
    app,
    byte_progress,
    check_before_stage,
    err,
    hub_logging,
    out,
    print_json,
)
from openrelease.cli.check import render_verify_report
from openrelease.params import load_params

if TYPE_CHECKING:
    from openrelease.release.publish import PublishReport


@app.command("bundle")
def bundle_cmd(
    project_dir: Annotated[
        Path, typer.Argument(help="The workspace: holds params.yaml and artifacts/.")
    ] = Path("."),
    out_dir: Annotated[
        Path, typer.Option("--out", help="Release folder to write (replaced atomically).")
    ] = Path(layout.RELEASE_DIR),
    params: ParamsOpt = DEFAULT_PARAMS,
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

    params_path = project_dir / params if not params.is_absolute() else params
    check_before_stage(params_path)
    pipeline = load_params(params_path)
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
        print_json(report)
        return
    out.print(
        f"bundle: {report.num_files} files, {report.num_bytes / 1e6:.1f} MB "
        f"({report.num_linked} hard-linked, {report.bytes_hashed / 1e6:.1f} MB hashed), "
        f"{len(report.components)}/17 MOF components -> {report.out_dir}",
        highlight=False,
    )


@app.command("keygen")
def keygen_cmd(
    key: Annotated[Path, typer.Argument(help="Private key file to create (PEM, mode 600).")],
) -> None:
    """Create an EC P-256 key pair for signing releases (KEY and KEY.pub)."""
    from openrelease.verify.signing import generate_key

    pub, kid = generate_key(key)
    out.print(f"private key: {key}\npublic key:  {pub}\nkey id:      {kid}", highlight=False)


@app.command("sign")
def sign_cmd(
    bundle: Annotated[Path, typer.Argument(help="The release folder to sign.")],
    key: Annotated[Path, typer.Option("--key", help="EC private key PEM (openrelease keygen).")],
    as_json: JsonOpt = False,
) -> None:
    """Verify a release, then sign it with OpenSSF model-signing (signatures/model.sig)."""
    from openrelease.verify.bundle import verify_bundle
    from openrelease.verify.signing import sign_bundle

    report = verify_bundle(bundle)
    if not report.ok:
        render_verify_report(report)
        err.print(f"{bundle} does not verify; not signed", highlight=False)
        raise typer.Exit(1)
    path, kid = sign_bundle(bundle, key)
    if as_json:
        print_json({"signature": str(path), "key_id": kid})
    else:
        out.print(f"signed {bundle} with {kid} -> {path}", highlight=False)


@app.command("publish")
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
    from openrelease.release.publish import execute_publish, plan_publish

    hub_logging()
    from openrelease.verify.bundle import verify_bundle

    ask = not (dry_run or yes or as_json)
    plan = plan_publish(  # verifies the bundle and reads the remote, once
        bundle,
        repo_id=repo_id,
        endpoint=endpoint,
        revision_tag=tag,
        verify=verify_bundle,
        require_class=require_class.number if require_class else None,
        require_token=not (dry_run or ask),  # asking first: a missing token fails after "yes"
    )
    if ask:
        _render_publish(plan.report)
        if not typer.confirm("publish?", err=True):
            raise typer.Exit(1)
    if dry_run:
        report = plan.report
    else:
        bar, tick = byte_progress("uploading")
        with bar:
            report = execute_publish(plan, private=private, progress=tick)
    if as_json:
        print_json(report)
    else:
        _render_publish(report)
    if not dry_run and not report.ok:  # a dry run's plan lists what is not there yet
        raise typer.Exit(1)


def _render_publish(report: PublishReport) -> None:
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
    if report.retargeted:
        out.print(
            f"re-rendered for {report.repo_id} (built for {report.built_for}): "
            + ", ".join(report.retargeted),
            markup=False,
            highlight=False,
        )
    if report.incomplete:
        out.print(
            "  main holds PUBLISHING_IN_PROGRESS.md: an earlier publish was interrupted; "
            "publishing finishes it",
            markup=False,
            highlight=False,
        )
    for f in report.allowed_secrets:
        out.print(
            f"  allowed secret-like text: {f.path}:{f.line} ({f.what}; {f.allowed_by})",
            markup=False,
            highlight=False,
        )
    for label, paths in (("missing", report.missing), ("mismatched", report.mismatched)):
        for path in paths:
            out.print(f"  {label}: {path}", markup=False, highlight=False)
