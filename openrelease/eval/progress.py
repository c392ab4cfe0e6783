"""Progress lines for logs that are not a terminal: each step as it starts, and a heartbeat.

A `dvc exp run` log showed nothing for minutes while lm-eval ran; `Heartbeat` logs what is running
at least every ``every_s`` seconds from a daemon thread, so a quiet step still shows it is alive.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

logger = logging.getLogger(__name__)


class Heartbeat:
    """Logs ``eval: <step>`` as each step starts and ``eval: still <step>`` while it runs.

    With ``every_s`` None it logs nothing (a terminal shows a progress bar instead).
    """

    def __init__(self, every_s: float | None) -> None:
        self.every_s = every_s
        self._what = "starting"
        self._began = self._step_began = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, what: str) -> None:
        """A new step starts: log it with the time elapsed since the start."""
        now = time.monotonic()
        with self._lock:
            self._what, self._step_began = what, now
        if self.every_s is not None:
            logger.info("eval: %s [%.0fs elapsed]", what, now - self._began)

    def _beat(self) -> None:
        assert self.every_s is not None
        while not self._stop.wait(self.every_s):
            now = time.monotonic()
            with self._lock:
                what, began = self._what, self._step_began
            logger.info(
                "eval: still %s (%.0fs on it) [%.0fs elapsed]", what, now - began, now - self._began
            )

    def __enter__(self) -> Heartbeat:
        if self.every_s is not None:
            self._thread = threading.Thread(target=self._beat, name="eval-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.every_s is not None and exc is None:
            logger.info("eval: done [%.0fs elapsed]", time.monotonic() - self._began)
