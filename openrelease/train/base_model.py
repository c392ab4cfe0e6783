"""Base models: start a stage from an existing causal LM on the Hub or in a local folder.

Two steps, usable from any caller (a stage's ``from: hf:ORG/NAME@REVISION`` or folder):

    ref = resolve_base_model("hf:ORG/NAME@SHA", allow_floating_revision=False)
    folder, pinned = fetch_base_model(ref, cache_dir=Workspace(project).root)

`resolve_base_model` pins the revision to a commit and lists the model files with the Hub's
digests; `fetch_base_model` downloads them into the workspace's Hub cache and checks every
file's sha256 (LFS) or git blob sha1 before anything loads it, returning the folder and its
`PinnedSource` record (repo, commit, every file's sha256), which it also writes beside the
snapshot. Only safetensors weights are read: pickled ``.bin`` weights from strangers are never
loaded.

A commit never changes on the Hub, so `cached_base_model` uses a snapshot fetched before
without asking the Hub again (offline, as a replay must be able to run) when the spec pins that
commit and every file still has its recorded sha256; anything else goes back to the Hub.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from openrelease.data import hub
from openrelease.digest import sha256_file
from openrelease.errors import ArtifactError
from openrelease.layout import Workspace
from openrelease.manifest import PinnedSource, read_model, write_json

logger = logging.getLogger(__name__)

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "README.md",
)
"""What a base model needs from its repo: config, generation config, safetensors weights, and
the model card (for its license tag)."""


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved base model: a Hub commit and its model files, or a local folder."""

    spec: str
    """As written in params: ``hf:ORG/NAME@REVISION`` or a folder path."""
    snapshot: hub.HubSnapshot | None
    """The Hub commit and the files to fetch (with the Hub's digests); None for a folder."""
    folder: Path | None
    """The local folder (absolute); None for a Hub model."""

    @property
    def commit(self) -> str | None:
        """The resolved commit sha (Hub models)."""
        return self.snapshot.commit if self.snapshot is not None else None


def _check_weights(paths: list[str], *, where: str) -> None:
    if "config.json" not in paths:
        raise ArtifactError(f"{where} has no config.json; it is not a transformers model folder.")
    if not any(p.endswith(".safetensors") for p in paths):
        pickled = [p for p in paths if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" (only pickled {pickled[0]}, never loaded)" if pickled else ""
        raise ArtifactError(
            f"{where} has no .safetensors weights{hint}; convert the model to safetensors."
        )


def resolve_base_model(
    spec: str,
    *,
    allow_floating_revision: bool = False,
    project_dir: Path | None = None,
    what: str = "from",
) -> BaseModelRef:
    """Resolve ``spec`` (``hf:ORG/NAME@REVISION`` or a folder) without downloading weights.

    Args:
        spec: The base model, as in params.
        allow_floating_revision: Accept a branch or tag (its commit is recorded).
        project_dir: Folder specs are relative to it (default: the current folder).
        what: The params key, for error messages.

    Raises:
        ParamsError: A malformed spec, or a floating revision that is not allowed.
        ArtifactError: The repo, revision or folder does not exist, or holds no safetensors.
    """
    if not hub.is_hub_spec(spec):
        folder = (project_dir or Path.cwd()) / Path(spec).expanduser()
        if not folder.is_dir():
            raise ArtifactError(
                f"{what}: {spec} is not a folder; give a local transformers model folder or "
                "hf:ORG/NAME@SHA.",
                path=spec,
            )
        _check_weights([p.name for p in folder.iterdir()], where=f"{what}: {spec}")
        return BaseModelRef(spec=spec, snapshot=None, folder=folder.resolve())
    snapshot = hub.resolve_spec(
        spec, repo_type="model", allow_floating=allow_floating_revision, what=what
    )
    files = hub.select(snapshot, MODEL_FILES)
    _check_weights(
        [f.path for f in snapshot.files], where=f"{what}: {snapshot.repo}@{snapshot.commit[:12]}"
    )
    return BaseModelRef(
        spec=spec,
        snapshot=hub.HubSnapshot(
            snapshot.repo, snapshot.repo_type, snapshot.revision, snapshot.commit, files
        ),
        folder=None,
    )


def fetch_base_model(
    ref: BaseModelRef, *, cache_dir: Path, what: str = "from"
) -> tuple[Path, PinnedSource]:
    """Download (or reuse) the model files and check each one; return the folder and its pin.

    Args:
        ref: From `resolve_base_model`.
        cache_dir: The workspace root; files go to its ``.openrelease/hub/models/...`` folder.
        what: The params key, for error messages.

    Returns:
        The folder to load (``from_pretrained``), and the record naming repo, commit and the
        sha256 of every file.

    Raises:
        ArtifactError: A file does not have the Hub's digest (tampered or corrupt), or the
            download failed.
    """
    if ref.snapshot is None:
        assert ref.folder is not None, "a ref is a Hub snapshot or a folder"
        pinned = hub.pin_local(ref.folder, rel=ref.spec, what=what)
        return ref.folder, pinned.model_copy(update={"license": _folder_license(ref.folder)})
    snap = ref.snapshot
    dest = Workspace(cache_dir).hub_snapshot("model", snap.repo, snap.commit)
    entries = hub.fetch(snap, snap.files, dest=dest, what=what)
    pinned = hub.pin_hub(snap, entries, license=_folder_license(dest))
    write_json(Workspace(cache_dir).hub_pin("model", snap.repo, snap.commit), pinned)
    return dest, pinned


def cached_base_model(
    spec: str, *, cache_dir: Path, what: str = "from"
) -> tuple[Path, PinnedSource] | None:
    """The snapshot of ``spec`` in the Hub cache of ``cache_dir``, used without the Hub.

    Only for ``hf:ORG/NAME@<40-hex commit>`` fetched (and checked) before: its pin beside the
    snapshot names that repo and commit and every file still has the sha256 it records
    (hashed again here). None otherwise: the caller resolves and fetches from the Hub.

    Raises:
        ParamsError: ``spec`` is a malformed Hub spec.
    """
    if not hub.is_hub_spec(spec):
        return None
    parsed = hub.parse_hub_spec(spec, what=what)
    if not hub.is_commit(parsed.revision):
        return None  # a branch or tag: only the Hub knows where it points now
    workspace = Workspace(cache_dir)
    pin_path = workspace.hub_pin("model", parsed.repo, parsed.revision)
    if not pin_path.is_file():
        return None
    try:
        pinned = read_model(pin_path, PinnedSource)
    except ArtifactError:  # a damaged pin: the Hub says again what the commit holds
        logger.info("%s: %s is unreadable; asking the Hub", what, pin_path)
        return None
    if (pinned.kind, pinned.repo, pinned.commit) != ("hf", parsed.repo, parsed.revision):
        return None
    folder = workspace.hub_snapshot("model", parsed.repo, parsed.revision)
    for f in pinned.files:
        path = folder / f.path
        if not path.is_file() or sha256_file(path) != f.sha256:
            logger.info("%s: %s changed in the Hub cache; fetching it again", what, f.path)
            return None
    return folder, pinned


def _folder_license(folder: Path) -> str | None:
    readme = folder / "README.md"
    return hub.card_license(readme) if readme.is_file() else None
