"""The `openrelease` command line: parse, call one library function, render. Only here we print.

One module per command group registers its commands on the shared `app` (`cli.app`):
`pipeline` (params, data, summary, lineage, tracking), `project` (init, pipeline sync/check),
`train` (train, launch, eval, plot, reproduce), `release` (bundle, keygen, sign, publish) and
`check` (verify, audit). Errors are mapped once, by the root group in `cli.app`: errors a user
can fix print one line and exit 1; usage errors exit 2; tracebacks need OPENRELEASE_DEBUG=1.
"""

from openrelease.cli import check, pipeline, project, release, train
from openrelease.cli.app import app, main

__all__ = ["app", "check", "main", "pipeline", "project", "release", "train"]
