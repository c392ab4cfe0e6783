"""The shared Typer `app`: the root command group, its options, consoles and progress helpers.

Every error a command raises is mapped here, once, in `OpenReleaseGroup.invoke`: the root group
runs every command (`main()` and `CliRunner().invoke(app)` alike), so both behave the same.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from openrelease import __version__, layout
from openrelease.errors import OpenReleaseError
from openrelease.params import StageName
from openrelease.secrets import REDACTED, redact

if TYPE_CHECKING:
    from rich.progress import Progress
    from typer._click import Context

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
"""Terminal control characters (ESC, CR, C1 CSI ...) and bidi overrides; newline and tab pass."""


def clean(text: str) -> str:
    """``text`` with every control character shown escaped (ESC as backslash-x1b)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text: str) -> str:
    """An untrusted message as one clean line: control characters and newlines escaped."""
    return clean(text).replace("\n", " | ").replace("\t", " ")


class SafeConsole(Console):
    """A console for text that may come from strangers (file names, records, Hub replies).

    Markup and highlighting are off by default (a command opts in per call, escaping what it
    interpolates): untrusted brackets never raise MarkupError or restyle output, and a long token
    cannot make highlighting quadratic. Control characters are escaped before rendering.
    """

    def __init__(self, **kwargs: Any) -> None:
        for off in ("markup", "highlight", "emoji"):
            kwargs.setdefault(off, False)
        super().__init__(**kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Any:  # noqa: D102 - see the class
        return super().render_str(clean(text), **kwargs)


out = SafeConsole(soft_wrap=True)
err = SafeConsole(stderr=True, soft_wrap=True)


def _debug() -> bool:
    return os.environ.get("OPENRELEASE_DEBUG", "") not in ("", "0")


class OpenReleaseGroup(TyperGroup):
    """The root command group; it maps the errors of every command it runs.

    An OpenReleaseError prints one ``error:`` line and exits 1; any other exception (a bug)
    prints one ``internal error:`` line and exits 1; Ctrl-C exits 130. With OPENRELEASE_DEBUG=1
    both errors propagate with their traceback. Usage errors (exit 2) and `typer.Exit` pass.
    """

    def invoke(self, ctx: Context) -> Any:
        """Run the command line's command, mapping what it raises."""
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # exits and usage errors
            raise
        except BrokenPipeError:  # `openrelease ... | head`: the reader has what it wanted
            _silence_stdout()
            raise typer.Exit(0) from None
        except OpenReleaseError as exc:
            if _debug():
                raise
            err.print(f"[red]error:[/red] {escape(_message(exc))}", markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except OSError as exc:  # a path of the wrong kind, a permission, a full disk ...
            if _debug():
                raise
            where = f"{exc.filename}: " if isinstance(exc.filename, str) else ""
            why = exc.strerror or type(exc).__name__
            err.print(
                f"[red]error:[/red] {escape(_message(Exception(where + why)))}; check the path "
                "and its permissions.",
                markup=True,
            )
            raise typer.Exit(1) from None
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # a bug, or a library panic (pyo3 PanicException)
            if _debug():
                raise
            err.print(
                f"[red]internal error:[/red] {escape(type(exc).__name__)}: "
                f"{escape(_message(exc))} "
                "(re-run with OPENRELEASE_DEBUG=1 for the traceback and report it)",
                markup=True,
            )
            raise typer.Exit(1) from None


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def _message(exc: BaseException) -> str:
    """An exception's text as printed: one line, secrets (URL credentials, tokens) redacted."""
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", redact(str(exc)))
    return one_line(text)[:2000]


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush meets no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (CliRunner): nothing left to flush
        pass


@contextmanager
def reader_may_leave() -> Iterator[None]:
    """Render output that a pipe reader may stop reading (`verify | head`): no error then."""
    try:
        yield
    except BrokenPipeError:
        _silence_stdout()


app = typer.Typer(
    name="openrelease",
    cls=OpenReleaseGroup,
    help="Reproducible, verifiable, MOF-scored open LLM releases.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="Params file (a recipe from pipelines/).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
StageOpt = Annotated[StageName, typer.Option("--stage", help="Training stage.")]
EndpointOpt = Annotated[
    str | None, typer.Option("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co).")
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch or tag.")]
DEFAULT_PARAMS = Path(layout.PARAMS)
"""The default of every ``--params``: ``params.yaml`` in the current folder."""


class MofClassName(StrEnum):
    """A MOF class on the command line (I is the most open)."""

    I = "I"  # noqa: E741 - the MOF's own name for the class
    II = "II"
    III = "III"

    @property
    def number(self) -> int:
        """1, 2 or 3."""
        return {"I": 1, "II": 2, "III": 3}[self.value]


def print_json(obj: BaseModel | dict[str, Any]) -> None:
    """Write a report (or a plain dict) to stdout as sorted, indented JSON."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def byte_progress(label: str) -> tuple[Progress, Callable[[int, int], None]]:
    """A byte bar on stderr (hidden off a terminal) and its ``(done, total)`` callback."""
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
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _CleanRecords) for f in handler.filters):
            handler.addFilter(_CleanRecords())
    logging.getLogger("openrelease").setLevel(logging.DEBUG if _debug() else logging.INFO)


class _CleanRecords(logging.Filter):
    """Log lines pass as one clean line with secrets (URL credentials, tokens) redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = _message(Exception(record.getMessage())), None
        return True


def hub_logging() -> None:
    """Let huggingface_hub log through the root handler only (cleaned, once, never twice).

    On import it adds a stderr handler of its own, which would print each warning a second
    time, unredacted.
    """
    import huggingface_hub.utils.logging as hf_logging

    root = hf_logging._get_library_root_logger()
    for handler in list(root.handlers):
        root.removeHandler(handler)


def main() -> None:
    """Console-script entry point."""
    app()


def check_before_stage(params: Path) -> None:
    """Run `pipeline check` when a DVC pipeline runs this stage (a dvc.yaml beside params)."""
    from openrelease.params import load_params
    from openrelease.pipeline import check_pipeline

    project = params.resolve().parent
    if (project / layout.DVC_FILE).is_file():
        check_pipeline(project, load_params(params))
