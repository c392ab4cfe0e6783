"""The one secret policy: which names and values are secrets, for redaction and refusal alike.

MLflow redaction (record.tracking), the bundle writer (release.files) and publish's refusal
(release.publish) all ask this module, so a value publish would refuse can never land in MLflow
or a bundle. Why not detect-secrets' default plugins: its entropy detectors flag every sha256
digest we record (thousands per run), and it has no Hugging Face token detector; the patterns
below are the subset of its detectors (AWS, GitHub, private keys, basic-auth URLs) that apply,
plus Hugging Face tokens. What we do take from detect-secrets is its allowlist pragma
(``pragma: allowlist secret`` in a comment on the line, or ``pragma: allowlist nextline secret``
on the line before), so a fixture marked for detect-secrets is marked for us too.

A file finding is allowed only where the source marks it with that pragma or a
``release.allowed_secrets`` rule (a path glob and a reason) covers its file; the value of a
secret-named environment variable is never allowed, whatever marks it.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SECRET_NAME = re.compile(
    r"TOKEN|SECRET|PASSW|API_?KEY|PRIVATE|CREDENTIAL|AUTH(?!OR)", re.IGNORECASE
)
"""Environment variable names (and params keys) whose values are secrets."""

MIN_SECRET_CHARS = 8
"""Shorter values of secret-named variables are not treated as secrets (``AUTH=1``)."""

VALUE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("a Hugging Face token", r"\bhf_[A-Za-z0-9]{30,}"),
    ("a private key", r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
    ("an AWS access key id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("an AWS secret key", r"(?i:aws_secret_access_key)\s*[=:]\s*\S{20,}"),
    ("a GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,})"),
)
"""(what it is, pattern) for secrets recognisable by their shape alone."""

_VALUE_TEXT = re.compile("|".join(f"(?:{p})" for _, p in VALUE_PATTERNS))
_VALUE_BYTES = tuple((what, re.compile(p.encode())) for what, p in VALUE_PATTERNS)
_URL_PASSWORD = re.compile(r"(://[^/@\s:]*:)[^/@\s]+@")
"""The password of ``scheme://user:password@host`` (e.g. in MLFLOW_TRACKING_URI)."""
REDACTED = "[REDACTED]"


def is_secret_name(name: str) -> bool:
    """True when a variable or key of this name holds a secret."""
    return SECRET_NAME.search(name) is not None


def secret_env_values(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{name: value}`` of the secret-named environment variables long enough to matter."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_CHARS}


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` with every secret replaced by ``[REDACTED]``.

    Secrets are: values of a known shape (tokens, keys), URL passwords, the values of
    secret-named environment variables, and ``extra`` values.
    """
    text = _VALUE_TEXT.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    for value in [*secret_env_values().values(), *extra]:
        if len(value) >= MIN_SECRET_CHARS:
            text = text.replace(value, REDACTED)
    return text


def key_like_env_values(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The secret-named variables whose values look like keys, for refusing a file.

    A value counts when it is 16+ characters with letters and digits, no space or ``@``, and is
    not a path, so ``GIT_AUTHOR_EMAIL`` or ``SSH_AUTH_SOCK`` never block a release. Redaction
    (`redact`) removes every secret-named value; refusal asks for this stricter subset.
    """
    found = {}
    for name, value in sorted(secret_env_values(env).items()):
        if (
            len(value) >= 16
            and not re.search(r"[\s@]", value)
            and not value.startswith(("/", "~", "."))
            and re.search(r"[A-Za-z]", value) is not None
            and re.search(r"[0-9]", value) is not None
        ):
            found[name] = value
    return found


SecretPatterns = tuple[tuple[str, "re.Pattern[bytes]"], ...]


def refusal_patterns(env: Mapping[str, str] | None = None) -> SecretPatterns:
    """(what, bytes pattern) of everything a release must not contain.

    Known token shapes plus the values of `key_like_env_values`, each named by its variable.
    """
    env_patterns = tuple(
        (f"the value of ${name}", re.compile(re.escape(value.encode())))
        for name, value in key_like_env_values(env).items()
    )
    return (*_VALUE_BYTES, *env_patterns)


def find_secret(data: bytes, patterns: SecretPatterns) -> str | None:
    """What secret ``data`` holds ("a GitHub token", "the value of $HF_TOKEN"), or None."""
    for what, pattern in patterns:
        if pattern.search(data):
            return what
    return None


ALLOWABLE = frozenset(what for what, _ in VALUE_PATTERNS)
"""What a pragma or rule may allow: test-fixture shapes, never a live environment value."""
SCAN_CHUNK, SCAN_OVERLAP, MAX_SAFETENSORS_HEADER = 1 << 20, 4096, 100 << 20


@dataclass(frozen=True)
class Finding:
    """One secret-like match in a file; ``allowed_by`` says what allowed it (None: refused)."""

    path: str
    line: int
    what: str
    allowed_by: str | None = None


AllowRules = Sequence[tuple[str, str]]
"""``(path glob, reason)`` pairs from ``release.allowed_secrets``."""


def _chunks(path: Path, rel: str) -> Iterator[bytes]:
    """The bytes to scan: a safetensors file's JSON header only (tensors hold no text)."""
    with path.open("rb") as f:
        if rel.endswith(".safetensors"):
            size = min(int.from_bytes(f.read(8), "little"), MAX_SAFETENSORS_HEADER)
            yield f.read(size)
            return
        while chunk := f.read(SCAN_CHUNK):
            yield chunk


def _pragma_allows(rel: str, line: bytes, previous: bytes) -> bool:
    # Imported here: detect-secrets costs ~0.1 s to import and only file scans need it.
    from detect_secrets.filters.allowlist import is_line_allowlisted
    from detect_secrets.util.code_snippet import CodeSnippet

    text, before = line.decode("utf-8", "replace"), previous.decode("utf-8", "replace")
    snippet = CodeSnippet([before, text], start_line=0, target_index=1)
    return bool(is_line_allowlisted(rel, text, snippet))


def scan_file(
    path: Path, rel: str, patterns: SecretPatterns, rules: AllowRules = ()
) -> list[Finding]:
    """Every secret-like match in one file, each with its line and what allows it, if anything.

    Read in 1 MiB chunks with an overlap, so a match across a chunk boundary is found once.

    Args:
        path: The file.
        rel: Its path in the release (what rules match and findings name).
        patterns: From `refusal_patterns`.
        rules: ``(path glob, reason)`` pairs; a match in a file a glob covers is allowed.
    """
    rule = next(
        (f"release.allowed_secrets: {why}" for g, why in rules if fnmatch.fnmatch(rel, g)), None
    )
    findings: dict[tuple[int, str], Finding] = {}
    tail, base, lines_before = b"", 0, 0
    for chunk in _chunks(path, rel):
        window = tail + chunk
        for what, pattern in patterns:
            for m in pattern.finditer(window):
                if (base + m.start(), what) in findings:
                    continue
                start = window.rfind(b"\n", 0, m.start()) + 1
                end = window.find(b"\n", m.end())
                line = window[start : end if end >= 0 else len(window)]
                previous = window[window.rfind(b"\n", 0, max(start - 1, 0)) + 1 : max(start - 1, 0)]
                allowed_by = None
                if what in ALLOWABLE:
                    if _pragma_allows(rel, line, previous):
                        allowed_by = "pragma: allowlist secret"
                    else:
                        allowed_by = rule
                number = lines_before + window.count(b"\n", 0, m.start()) + 1
                findings[(base + m.start(), what)] = Finding(rel, number, what, allowed_by)
        tail = window[-SCAN_OVERLAP:]
        lines_before += window.count(b"\n", 0, len(window) - len(tail))
        base += len(window) - len(tail)
    return [findings[k] for k in sorted(findings)]


def scan_files(
    root: Path, rels: Iterable[str], rules: AllowRules = (), env: Mapping[str, str] | None = None
) -> list[Finding]:
    """`scan_file` over ``root/<rel>`` for every ``rel``, against `refusal_patterns` (``env``)."""
    patterns = refusal_patterns(env)
    return [f for rel in rels for f in scan_file(root / rel, rel, patterns, rules)]
