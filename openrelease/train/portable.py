"""Pickle-free training states: what a bundle ships and what a replay of a bundle loads.

The trainer's own states are torch.distributed.checkpoint (DCP) folders: fast, sharded and
reshardable, but DCP's ``.metadata`` and the per-rank RNG files are pickles, which must never be
loaded from someone else's release. So a bundle ships each state in the portable form instead
(``openrelease.layout.PORTABLE_STATE_FILES``):

- ``state.json``: the state's record, copied;
- ``model-state.safetensors``: the full (unsharded) model state, FQN -> tensor;
- ``optim-state.safetensors``: the full optimizer tensors, ``<FQN>/<name>`` -> tensor;
- ``optim-state.json``: the optimizer's param groups and non-tensor per-parameter values;
- ``rng-state.safetensors``: every rank's RNG streams, ``<rank>/<device>`` -> uint8 tensor.

`export_state` converts a DCP state this trainer wrote (trusted: it is read in this workspace, with
``weights_only`` for the RNG files) into that form; `load_portable_state` loads it with
safetensors and the strict JSON reader only, and reshards it onto the current process group.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from openrelease.errors import ArtifactError
from openrelease.layout import (
    PORTABLE_STATE_FILES,
    STATE_FILE,
    STATE_MODEL,
    STATE_OPTIM,
    STATE_OPTIM_JSON,
    STATE_RNG,
    TMP_PREFIX,
)
from openrelease.manifest import write_json
from openrelease.safeio import read_json_file

_TUPLE = "__tuple__"
"""Marks a tuple in optim-state.json (AdamW's betas), so it loads back as a tuple."""
_RNG_PREFIX = "rng_rank"
MAX_OPTIM_JSON_BYTES = 64 << 20


def _encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ArtifactError(f"optimizer state holds a {type(value).__name__}, which JSON cannot keep.")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_decode(v) for v in value[_TUPLE])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _dcp_state(state_dir: Path) -> dict[str, Any]:
    """The whole DCP state (model and optimizer) as full CPU tensors, read in this process."""
    sd: dict[str, Any] = {}
    # Trusted: this workspace's own state, written by `checkpoint.save_state`.
    _load_state_dict(
        sd,
        storage_reader=FileSystemReader(str(state_dir)),
        planner=_EmptyStateDictLoadPlanner(),  # type: ignore[no-untyped-call]
        no_dist=True,
    )
    return sd


def _rng_tensors(state_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(state_dir.glob(f"{_RNG_PREFIX}*.pt")):
        rank = path.stem.removeprefix(_RNG_PREFIX)
        # Trusted (written by `checkpoint.save_state`) and loaded with weights_only all the same.
        streams: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
        tensors |= {f"{rank}/{device}": t for device, t in streams.items()}
    return tensors


def _source_stamp(state_dir: Path) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of every file of a DCP state: what its portable copy came from."""
    stamp: dict[str, list[int]] = {}
    for entry in sorted(os.scandir(state_dir), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            stamp[entry.name] = [st.st_size, st.st_mtime_ns]
    return stamp


def export_state(state_dir: Path, out: Path) -> Path:
    """Write the portable form of the DCP state ``state_dir`` into the folder ``out``.

    ``out`` lies outside ``state_dir`` (the bundle never writes into a training stage's DVC
    output). A complete ``out`` made from the same state files (``<out>.source.json``: their
    sizes and mtimes) is reused; anything else is rebuilt and swapped in atomically.

    Returns:
        ``out``.
    """
    stamp_path = out.with_name(f"{out.name}.source.json")
    stamp = _source_stamp(state_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} == PORTABLE_STATE_FILES:
        try:
            if json.loads(stamp_path.read_text(encoding="utf-8")) == stamp:
                return out
        except (OSError, ValueError):
            pass  # no or unreadable stamp: rebuild
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        sd = _dcp_state(state_dir)
        model = {k: v.contiguous() for k, v in sd["model"].items() if isinstance(v, torch.Tensor)}
        optim = sd["optim"]
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, dict[str, Any]] = {}
        for fqn, entry in optim["state"].items():
            for name, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{fqn}/{name}"] = value.contiguous()
                else:
                    values.setdefault(fqn, {})[name] = _encode(value)
        save_file(model, str(tmp / STATE_MODEL))
        save_file(tensors, str(tmp / STATE_OPTIM))
        save_file(_rng_tensors(state_dir), str(tmp / STATE_RNG))
        groups = _encode(optim["param_groups"])
        write_json(tmp / STATE_OPTIM_JSON, {"param_groups": groups, "state_values": values})
        shutil.copyfile(state_dir / STATE_FILE, tmp / STATE_FILE)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        write_json(stamp_path, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_portable(state_dir: Path) -> bool:
    """Whether ``state_dir`` is a portable (pickle-free) state rather than a DCP one."""
    return (state_dir / STATE_MODEL).is_file()


def pickle_free_problem(state_dir: Path) -> str | None:
    """Why ``state_dir`` is not exactly a portable state (regular files only), or None."""
    try:
        entries = list(os.scandir(state_dir))
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    names = {e.name for e in entries}
    if odd := sorted(names - PORTABLE_STATE_FILES):
        return f"holds {odd[0]!r}, which is not part of a pickle-free training state"
    if missing := sorted(PORTABLE_STATE_FILES - names):
        return f"lacks {missing[0]}"
    if bad := [e.name for e in entries if not e.is_file(follow_symlinks=False)]:
        return f"holds {bad[0]!r}, which is not a regular file"
    return None


def load_portable_state(
    state_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> None:
    """Load a portable state into ``model`` and ``optimizer`` in place; collective.

    Every rank reads the full tensors (safetensors only, no pickle) and keeps its own shard.

    Raises:
        ArtifactError: The state lacks this rank's RNG streams (another world size).
    """
    if problem := pickle_free_problem(state_dir):
        raise ArtifactError(f"{state_dir} {problem}; refusing to load it.", path=str(state_dir))
    full_model = load_file(str(state_dir / STATE_MODEL))
    meta = read_json_file(state_dir / STATE_OPTIM_JSON, max_bytes=MAX_OPTIM_JSON_BYTES)
    state: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(str(state_dir / STATE_OPTIM)).items():
        fqn, name = key.rsplit("/", 1)
        state.setdefault(fqn, {})[name] = tensor
    for fqn, entry in _decode(meta["state_values"]).items():
        state.setdefault(fqn, {}).update(entry)
    full_optim = {"state": state, "param_groups": _decode(meta["param_groups"])}
    rng = load_file(str(state_dir / STATE_RNG))
    mine = {k.split("/", 1)[1]: v for k, v in rng.items() if k.split("/", 1)[0] == str(rank)}
    if "cpu" not in mine:
        raise ArtifactError(
            f"{state_dir / STATE_RNG} has no RNG streams for rank {rank}: the state was saved "
            "with another world size; replay with the recorded number of processes."
        )
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=dict[str, Any](full_model),
        optim_state_dict=full_optim,
        options=options,
    )
    torch.set_rng_state(mine["cpu"])
    if "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"])
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
