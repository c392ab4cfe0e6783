"""The exception tree: every error a user can fix derives from OpenReleaseError.

Messages name the thing and the fix. Library code only raises them; the CLI's root command
group (`openrelease.cli.app.OpenReleaseGroup.invoke`, which runs every command for `main()` and
for `CliRunner().invoke(app)` alike) prints one ``error:`` line and exits 1.
"""

from __future__ import annotations


class OpenReleaseError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""


class ParamsError(OpenReleaseError):
    """params.yaml (or a recipe) is missing, malformed or has an invalid value."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class DataError(OpenReleaseError):
    """An input data file is malformed; the message names file:line and the reason."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class ArtifactError(OpenReleaseError):
    """A file is missing, unreadable, or its digest does not match the record."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ProvenanceError(OpenReleaseError):
    """Lineage is broken: a missing parent record, or a record that contradicts the files."""


class PublishError(OpenReleaseError):
    """The Hub refused an upload, or the bundle is not fit to publish."""
