"""Encode a probe text with an untrusted tokenizer.json, with a time limit when it holds regexes.

A tokenizer.json may carry its own regular expressions (a ``Split`` pre-tokenizer, a ``Replace``
normalizer). `tokenizers` runs them with no step limit, so a crafted pattern (catastrophic
backtracking) can hang the caller for hours. Such a tokenizer is encoded in a child process that
is killed after ``timeout_s`` seconds and capped in memory; one without a regex of its own is
encoded here. A panic inside `tokenizers` (a BaseException) is an error too, never a crash.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from openrelease.errors import ArtifactError
from openrelease.safeio import loads_json

TIMEOUT_S = 20.0
MEMORY_BYTES = 4 << 30
WORKER = "openrelease.verify.tokenizer_probe"


def has_own_regex(doc: Any) -> bool:
    """Whether the tokenizer JSON ``doc`` holds a ``{"Regex": ...}`` pattern anywhere."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Regex" in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _encode_here(text: str, probe: str) -> tuple[int, ...]:
    from tokenizers import Tokenizer

    try:
        return tuple(Tokenizer.from_str(text).encode(probe).ids)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # tokenizers raises bare Exception, or panics (BaseException)
        raise ArtifactError(
            f"cannot be loaded by `tokenizers`: {type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


def encode_probe(text: str, probe: str, *, timeout_s: float | None = None) -> tuple[int, ...]:
    """The ids of ``probe`` under the tokenizer.json ``text``.

    Raises:
        ArtifactError: The tokenizer cannot be loaded, panics, or (with its own regexes) runs
            past ``timeout_s`` (default `TIMEOUT_S`); the message does not name the file.
    """
    timeout_s = TIMEOUT_S if timeout_s is None else timeout_s
    if not has_own_regex(loads_json(text, where="tokenizer.json")):
        return _encode_here(text, probe)
    payload = json.dumps({"tokenizer": text, "probe": probe})
    try:
        done = subprocess.run(
            [sys.executable, "-m", WORKER],
            input=payload.encode("utf-8"),
            capture_output=True,
            timeout=timeout_s,
            check=False,
            preexec_fn=_limit_memory if sys.platform.startswith("linux") else None,
        )
    except subprocess.TimeoutExpired:
        raise ArtifactError(
            f"its own regular expressions took over {timeout_s:g} s on the short probe text "
            "(catastrophic backtracking?); the tokenizer was not used."
        ) from None
    if done.returncode != 0:
        last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        why = last[0][:300]
        prefix = "cannot be loaded by `tokenizers`"
        raise ArtifactError(why if why.startswith(prefix) else f"{prefix}: {why}")
    ids = loads_json(done.stdout, where="the tokenizer probe's output")
    return tuple(int(i) for i in ids)


def main() -> None:
    """Child process: read {"tokenizer", "probe"} JSON on stdin, print the ids as JSON."""
    request = json.loads(sys.stdin.buffer.read())
    try:
        ids = _encode_here(request["tokenizer"], request["probe"])
    except ArtifactError as exc:
        sys.stderr.write(f"{exc}\n")
        raise SystemExit(1) from None
    sys.stdout.write(json.dumps(list(ids)))


if __name__ == "__main__":
    main()
