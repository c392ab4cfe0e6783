"""Rank-0 progress: a rich line (step, loss, tokens/s, ETA) on a TTY, plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

logger = logging.getLogger(__name__)


class ProgressReporter:
    """Report training steps; a no-op when ``enabled`` is false (ranks other than 0)."""

    def __init__(self, stage: str, *, total: int, start: int, enabled: bool) -> None:
        self.stage, self.total, self.start, self.enabled = stage, total, start, enabled
        self.log_every = max(1, total // 20)  # plain log lines (no TTY): about 20 per stage
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressReporter:
        if self.enabled and sys.stderr.isatty():
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(
                self.stage, total=self.total, completed=self.start, stats=""
            )
        return self

    def update(self, step: int, *, loss: float | None, tokens_per_s: float) -> None:
        """Show that ``step`` finished with ``loss`` at ``tokens_per_s``."""
        if not self.enabled:
            return
        stats = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s" if loss is not None else ""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, stats=stats)
        elif step % self.log_every == 0 or step == self.total:
            logger.info("%s step %d/%d  %s", self.stage, step, self.total, stats)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
