"""Commands that check a release without changing it: verify and audit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from openrelease.cli.app import (
    EndpointOpt,
    JsonOpt,
    MofClassName,
    RevisionOpt,
    app,
    byte_progress,
    clean,
    err,
    hub_logging,
    out,
    print_json,
    reader_may_leave,
)

if TYPE_CHECKING:
    from openrelease.audit.report import AuditReport
    from openrelease.verify.bundle import VerifyReport


def render_verify_report(report: VerifyReport) -> None:
    """Print a verify report: counts, then every difference and problem."""
    status = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    out.print(
        f"verify {escape(report.target)}: {status} ({report.num_files} files, "
        f"{report.num_bytes / 1e6:.1f} MB checked)",
        markup=True,
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


@app.command("verify")
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
            help="Public key (.pub, EC or Ed25519); require a valid signature by it. Repeatable.",
        ),
    ] = None,
) -> None:
    """Check that a release is exactly what its MANIFEST.json says (exit 1 when not)."""
    if target.startswith("hf:"):
        from openrelease.verify.hub import verify_hub

        hub_logging()

        if trusted_key:
            err.print("--trusted-key checks a local bundle; download it first", highlight=False)
            raise typer.Exit(2)

        with err.status(f"reading {escape(target)}"):
            report = verify_hub(target[3:], endpoint=endpoint, revision=revision)
    else:
        from openrelease.verify.bundle import verify_bundle

        bar, tick = byte_progress("hashing")
        with bar:
            report = verify_bundle(
                Path(target), progress=tick, num_threads=num_threads, trusted_keys=trusted_key
            )
    with reader_may_leave():
        if as_json:
            print_json(report)
        else:
            render_verify_report(report)
    if not report.ok:
        raise typer.Exit(1)


def render_audit_table(report: AuditReport) -> Table:
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
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics", help='Write {"mof_class": N} (1-3, 0 unclassified) for DVC metrics.'
        ),
    ] = None,
) -> None:
    """Score a release's MOF openness class from its evidence, not only its claims."""
    from openrelease.audit.report import audit
    from openrelease.manifest import write_text_atomic

    hub_logging()

    with err.status(f"auditing {escape(target)}"):
        report = audit(target, endpoint=endpoint, revision=revision, check_hashes=not no_hashes)
    if write_mof is not None:
        write_text_atomic(write_mof, report.to_mof_yaml())
    if metrics is not None:
        write_text_atomic(metrics, json.dumps({"mof_class": report.mof_class or 0}) + "\n")
    with reader_may_leave():
        if as_json:
            print_json(report)
        elif markdown:
            sys.stdout.write(clean(report.to_markdown()))
        else:
            out.print(render_audit_table(report))
            for p in report.problems:
                out.print(f"{p.severity}: {p.path or '-'}: {p.message}")
    if require_class is not None and not report.meets(require_class.number):
        err.print(
            f"{target}: MOF class {report.mof_class or 'none'} does not meet Class "
            f"{require_class.value}",
            highlight=False,
        )
        raise typer.Exit(1)
