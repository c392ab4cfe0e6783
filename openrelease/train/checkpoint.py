"""Checkpoints: resumable DCP training states and consolidated HF release folders, both atomic.

Also writes and reads the per-stage manifest. Every folder is built under ``.tmp-*`` and renamed;
a failed write removes its ``.tmp-*`` folder, and a full disk is an `ArtifactError` that says so.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from openrelease.digest import sha256_file, sha256_tree
from openrelease.errors import ArtifactError
from openrelease.layout import (
    CHECKPOINT_META,
    STATE_FILE,
    TMP_PREFIX,
    WEIGHTS,
    Workspace,
    checkpoint_rel,
    step_name,
    step_of,
)
from openrelease.manifest import (
    CheckpointFacts,
    CheckpointMeta,
    FileEntry,
    StageManifest,
    read_json,
    read_model,
    write_json,
)
from openrelease.train.portable import is_portable, load_portable_state


def _complete_steps(parent: Path, marker: str) -> list[tuple[int, Path]]:
    """``(step, folder)`` of each ``step-N`` folder under ``parent`` holding ``marker``, by step."""
    if not parent.is_dir():
        return []
    found = []
    for child in parent.iterdir():
        step = step_of(child.name)
        if step is not None and (child / marker).is_file():
            found.append((step, child))
    return sorted(found)


def remove_partial(parent: Path) -> list[Path]:
    """Delete leftover ``.tmp-*`` folders of interrupted writes under ``parent``; return them."""
    if not parent.is_dir():
        return []
    leftovers = [p for p in parent.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)
    return leftovers


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out first, then removed."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded")


def _is_disk_full(exc: BaseException, folder: Path, need_bytes: int) -> bool:
    """Whether ``exc``, raised while writing about ``need_bytes`` under ``folder``, is a full disk.

    Only plain file writes raise OSError(ENOSPC): safetensors raises its own error that quotes
    the OS message, torch's zip writer fails with "unexpected pos", and DCP wraps that in a
    CheckpointException. So a failed write with less than ``need_bytes`` free counts as well.
    """
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(word in str(exc) for word in _DISK_FULL_WORDS):
        return True
    try:
        return shutil.disk_usage(folder).free < need_bytes
    except OSError:
        return False


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


@contextmanager
def _writing(tmp: Path, final: Path, *, need_bytes: int, owner: bool = True) -> Iterator[None]:
    """Build ``final`` under ``tmp``: on failure the owner removes ``tmp``; a full disk says so.

    Raises:
        ArtifactError: The disk holding ``final`` is full (the message names it and the space).
    """
    try:
        yield
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        failed = isinstance(exc, Exception | CheckpointException)
        full = failed and _is_disk_full(exc, tmp.parent, need_bytes)
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        free = shutil.disk_usage(tmp.parent).free
        raise ArtifactError(
            f"disk full while writing {final}: {_mib(free)} free on its disk, about "
            f"{_mib(need_bytes)} needed; free some space, then re-run the stage "
            "(it resumes from its last saved state).",
            path=str(final),
        ) from exc


def _nbytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) state dict; a DTensor counts its global size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


# --------------------------------------------------------------------------- training states


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def list_states(states_dir: Path) -> dict[int, Path]:
    """Every complete training state under ``states_dir`` (one with state.json), by step."""
    return dict(_complete_steps(states_dir, STATE_FILE))


def latest_state(states_dir: Path) -> Path | None:
    """The newest complete training state under ``states_dir`` (one with state.json), or None."""
    states = _complete_steps(states_dir, STATE_FILE)
    return states[-1][1] if states else None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG streams (CPU, and CUDA when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class PendingState:
    """A training state being written; ``finish`` publishes it (collective on every rank)."""

    tmp_dir: Path
    final_dir: Path
    info: dict[str, Any]
    keep_last: int
    future: Future[Any] | None = None
    need_bytes: int = 0
    """About how much the state takes on disk (for the disk-full message)."""
    published: bool = False

    def finish(self) -> Path:
        """Wait for the write, then (rank 0) add state.json, rename into place, prune old ones.

        Calling it again once published does nothing.

        Returns:
            The published state folder.

        Raises:
            ArtifactError: The disk filled up; the partial state was removed.
        """
        if self.published:
            return self.final_dir
        owner = _rank() == 0
        with _writing(self.tmp_dir, self.final_dir, need_bytes=self.need_bytes, owner=owner):
            if self.future is not None:
                future, self.future = self.future, None
                future.result()
            _barrier()
            if owner:
                write_json(self.tmp_dir / STATE_FILE, self.info)
                _fsync_dir(self.tmp_dir)
                _replace_dir(self.tmp_dir, self.final_dir)
        if owner:
            for _, old in _complete_steps(self.final_dir.parent, STATE_FILE)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        self.published = True
        return self.final_dir


def save_state(
    states_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
    keep_last: int,
    async_group: dist.ProcessGroup | None = None,
) -> PendingState:
    """Start writing a resumable training state; collective, call on every rank.

    Model and optimizer go through DCP (sharded, reshardable); each rank adds its RNG streams in
    ``rng_rank<r>.pt``; rank 0 writes ``info`` (step, data position, ...) as state.json last.

    Args:
        states_dir: ``artifacts/<stage>/states``.
        step: The optimizer step just completed.
        model: The (FSDP2-sharded) model.
        optimizer: Its optimizer.
        info: JSON-able global state (step, tokens seen, parent checkpoint digest, ...).
        keep_last: How many complete states to keep after this one is published.
        async_group: When given, stage to CPU and write with ``dcp.async_save`` in a background
            thread over this (gloo) group, returning at once; else write synchronously and
            publish the state before returning.

    Returns:
        The pending write; call ``finish()`` before the next save and before exiting.

    Raises:
        ArtifactError: The disk filled up; the partial state was removed.
    """
    tmp = states_dir / f"{TMP_PREFIX}{step_name(step)}"
    owner = _rank() == 0
    msd, osd = get_state_dict(model, optimizer)
    pending = PendingState(tmp, states_dir / step_name(step), info, keep_last)
    pending.need_bytes = _nbytes(msd) + _nbytes(osd)
    with _writing(tmp, pending.final_dir, need_bytes=pending.need_bytes, owner=owner):
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), tmp / f"rng_rank{_rank()}.pt")
        if async_group is not None:
            fut = dcp_async_save(
                {"model": msd, "optim": osd}, checkpoint_id=str(tmp), process_group=async_group
            )
            pending.future = fut if isinstance(fut, Future) else fut.upload_completion
        else:
            dcp_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
    if pending.future is None:
        # Written already: publish now, so a failure before the next save cannot lose it.
        pending.finish()
    return pending


def load_state(
    state_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a training state into ``model`` and ``optimizer`` in place; collective.

    Also restores this rank's RNG streams. The world size must equal the saving run's for
    bit-exact continuation (DCP itself reshards). A pickle-free state (what a bundle ships, see
    `openrelease.train.portable`) is loaded with safetensors only; a DCP state is this
    workspace's own (its metadata is a pickle, so a DCP state from elsewhere is never loaded:
    `openrelease.reproduce` refuses one).

    Returns:
        The state's ``info`` dict (state.json).
    """
    info: dict[str, Any] = read_json(state_dir / STATE_FILE)
    if is_portable(state_dir):
        load_portable_state(state_dir, model=model, optimizer=optimizer, rank=_rank())
        return info
    rng_path = state_dir / f"rng_rank{_rank()}.pt"
    if not rng_path.is_file():
        raise ArtifactError(
            f"{rng_path} is missing: the state was saved with another world size; resume with "
            f"the same number of processes ({info.get('world_size')}) or delete {state_dir.parent}."
        )
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp_load(state, checkpoint_id=str(state_dir))  # self-written; see the docstring
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)
    _restore_rng(torch.load(rng_path, weights_only=True))  # self-written; see the docstring
    return info


# --------------------------------------------------------------------------- release checkpoints


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors; collective (call on every rank).

    Rank 0 gets the full tensors; other ranks get an empty dict (cpu_offload keeps them on 0).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=options)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _copy_tree(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and not path.is_symlink():
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_release_checkpoint(
    checkpoints_dir: Path,
    *,
    state_dict: dict[str, torch.Tensor],
    save_config: Callable[[Path], None],
    tokenizer_dir: Path,
    info: CheckpointFacts,
) -> CheckpointMeta:
    """Write ``checkpoints_dir/step-<N>`` as a ``save_pretrained`` folder plus meta.json.

    Built under ``.tmp-step-<N>`` and renamed, so a crash leaves earlier checkpoints intact.
    Each file's sha256 is computed here, once, and recorded in meta.json.

    Args:
        checkpoints_dir: ``artifacts/<stage>/checkpoints``.
        state_dict: Full weights (from `gather_full_state_dict` on rank 0).
        save_config: Writes config.json and generation_config.json into a folder.
        tokenizer_dir: The data stage's tokenizer folder; its files are copied in.
        info: The meta.json fields besides the file list.

    Returns:
        The meta.json record.

    Raises:
        ArtifactError: The disk filled up; the partial folder was removed, earlier ones are intact.
    """
    tmp = checkpoints_dir / f"{TMP_PREFIX}{step_name(info.step)}"
    final = checkpoints_dir / step_name(info.step)
    tokenizer_bytes = sum(p.stat().st_size for p in tokenizer_dir.rglob("*") if p.is_file())
    with _writing(tmp, final, need_bytes=_nbytes(state_dict) + tokenizer_bytes):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_config(tmp)
        tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _copy_tree(tokenizer_dir, tmp)
        entries = []
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(path)
            rel = path.relative_to(tmp).as_posix()
            size, sha = path.stat().st_size, sha256_file(path)
            entries.append(FileEntry(path=rel, size=size, sha256=sha))
        meta = CheckpointMeta(
            **info.model_dump(),
            files=tuple(entries),
            checkpoint_digest=sha256_tree({e.path: e.sha256 for e in entries}),
        )
        write_json(tmp / CHECKPOINT_META, meta)
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
    return meta


def list_checkpoints(checkpoints_dir: Path) -> list[CheckpointMeta]:
    """meta.json of every complete release checkpoint under ``checkpoints_dir``, by step."""
    return [
        read_model(p / CHECKPOINT_META, CheckpointMeta)
        for _, p in _complete_steps(checkpoints_dir, CHECKPOINT_META)
    ]


def load_weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a release checkpoint's model.safetensors."""
    path = checkpoint_dir / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-run the stage that wrote it.", path=str(path))
    return load_file(str(path))


# --------------------------------------------------------------------------- stage manifest


def write_stage_manifest(project_dir: Path, *, stage: str) -> StageManifest:
    """Write ``artifacts/<stage>/manifest.json`` listing the stage's release checkpoints.

    Reads each checkpoint's meta.json (digests were computed when it was written).

    Raises:
        ArtifactError: The stage has no complete checkpoint.
    """
    workspace = Workspace(project_dir)
    metas = list_checkpoints(workspace.checkpoints(stage))
    if not metas:
        raise ArtifactError(
            f"{workspace.checkpoints(stage)} holds no checkpoint; run `openrelease train {stage}`."
        )
    manifest = StageManifest(
        stage=stage,
        final_step=metas[-1].step,
        final_checkpoint=checkpoint_rel(stage, metas[-1].step),
        checkpoints=tuple(metas),
    )
    write_json(workspace.stage_manifest(stage), manifest)
    return manifest


def final_checkpoint(project_dir: Path, stage: str) -> tuple[Path, CheckpointMeta]:
    """The final release checkpoint of ``stage``, found through its stage manifest.

    Raises:
        ArtifactError: The stage has not run, or its final checkpoint folder is gone.
    """
    path = Workspace(project_dir).stage_manifest(stage)
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing; run `openrelease train {stage}` (or `dvc repro {stage}`) first.",
            path=str(path),
        )
    manifest = read_model(path, StageManifest)
    folder = project_dir / manifest.final_checkpoint
    if not (folder / CHECKPOINT_META).is_file():
        raise ArtifactError(
            f"{folder} listed in {path} is missing; re-run `dvc repro {stage}`.", path=str(folder)
        )
    return folder, manifest.checkpoints[-1]
