"""The hardware and kernel fingerprint of a run, and what differs between two of them.

Every stage record (record.json), its MLflow run and the bundle's logs carry `fingerprint()`:
the CPU (vendor, model, the ISA flags that select kernels), the kernel ISA torch dispatches to,
the BLAS/oneDNN builds torch links, the thread counts, the GPU stack when CUDA is visible, the
world size and the numerics environment variables. `reproduce` takes the replaying host's
fingerprint and `compare` names the differences that can explain a drift.

Keys are flat dotted strings with string values (MLflow tags as they are). torch is imported only
when the caller has already imported it (a trainer or a replay): a fingerprint never starts torch.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
)
"""/proc/cpuinfo flags that decide which kernels oneDNN, MKL and ATen pick (x86-64 and arm64)."""

NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUBLAS_WORKSPACE_CONFIG",
    "CUDA_VISIBLE_DEVICES",
)
"""Environment variables that change which kernels run (NCCL_* are added by prefix)."""

PREFIX_ENV = ("NCCL_",)
_SECRETISH = re.compile(r"(TOKEN|SECRET|PASSWORD|KEY)", re.IGNORECASE)


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as a dict (empty off Linux)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info.setdefault(key.strip(), value.strip())
    return info


def cpu_fingerprint(cpuinfo: Mapping[str, str] | None = None) -> dict[str, str]:
    """``cpu.vendor``, ``cpu.model``, ``cpu.family``, ``cpu.isa`` (kernel-relevant flags)."""
    info = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "cpu.arch": platform.machine(),
        "cpu.vendor": info.get("vendor_id") or info.get("CPU implementer") or "unknown",
        "cpu.model": info.get("model name") or info.get("CPU part") or platform.processor(),
        "cpu.family": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cpu.count": str(os.cpu_count()),
        "cpu.isa": ",".join(f for f in ISA_FLAGS if f in flags) or "unknown",
    }


def _config_versions(config: str) -> dict[str, str]:
    """MKL, oneDNN and BLAS builds from ``torch.__config__.show()``."""
    found: dict[str, str] = {}
    patterns = {
        "torch.mkl": r"Intel\(R\) (?:oneAPI )?Math Kernel Library Version ([\w.]+)",
        "torch.onednn": r"Intel\(R\) MKL-DNN (v[\w.]+)|oneDNN (v[\w.]+)",
        "torch.blas": r"BLAS_INFO=(\w+)",
        "torch.lapack": r"LAPACK_INFO=(\w+)",
        "torch.openblas": r"OpenBLAS ([\w.]+)",
    }
    for key, pattern in patterns.items():
        if match := re.search(pattern, config):
            found[key] = next(g for g in match.groups() if g).strip()
    return found


def torch_fingerprint() -> dict[str, str]:
    """Torch's kernel choices and the GPU stack; empty unless torch is already imported."""
    if "torch" not in sys.modules:
        return {}
    import torch

    out = {
        "torch.version": str(torch.__version__),
        "torch.cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "torch.threads": str(torch.get_num_threads()),
        "torch.interop_threads": str(torch.get_num_interop_threads()),
        "torch.deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()),
        **_config_versions(torch.__config__.show()),
    }
    out["torch.cuda"] = str(torch.version.cuda)
    if torch.cuda.is_available():
        out["gpu.name"] = torch.cuda.get_device_name(0)
        out["gpu.count"] = str(torch.cuda.device_count())
        major, minor = torch.cuda.get_device_capability(0)
        out["gpu.capability"] = f"{major}.{minor}"
        out["gpu.driver"] = _nvidia_driver()
        out["torch.cudnn"] = str(torch.backends.cudnn.version())  # type: ignore[no-untyped-call]
        nccl = torch.cuda.nccl.version()  # type: ignore[no-untyped-call]
        out["torch.nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return out


def _nvidia_driver() -> str:
    try:
        return Path("/sys/module/nvidia/version").read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


def env_fingerprint(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env.<NAME>`` of every numerics variable that is set (never one that looks secret)."""
    env = os.environ if environ is None else environ
    names = [n for n in NUMERICS_ENV if n in env]
    names += sorted(n for n in env if n.startswith(PREFIX_ENV) and not _SECRETISH.search(n))
    return {f"env.{n}": env[n] for n in names}


def fingerprint(
    *,
    world_size: int,
    nnodes: int = 1,
    mode: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The hardware and kernel fingerprint of this process, as record.json stores it.

    Args:
        world_size: Processes in the job.
        nnodes: Nodes in the job (topology: ``world_size`` over ``nnodes``).
        mode: ``compute.deterministic`` (``portable``, ``true`` or ``false``), when known.
        environ: The environment to read (default: this process's).
    """
    out = {
        **cpu_fingerprint(),
        **torch_fingerprint(),
        "job.world_size": str(world_size),
        "job.nnodes": str(nnodes),
        "job.topology": f"{nnodes}x{max(world_size // max(nnodes, 1), 1)}",
        **env_fingerprint(environ),
    }
    if mode is not None:
        out["compute.deterministic"] = mode
    return out


# --------------------------------------------------------------------------- comparison

_EXPLAINS = (
    "torch.cpu_capability",
    "torch.version",
    "torch.mkl",
    "torch.onednn",
    "torch.blas",
    "torch.openblas",
    "torch.threads",
    "torch.deterministic_algorithms",
    "torch.cuda",
    "torch.cudnn",
    "torch.nccl",
    "gpu.",
    "job.",
    "env.",
    "compute.deterministic",
)
"""Keys whose difference changes which kernels run, or how work is split."""
_CPU_KERNELS = ("cpu.isa", "cpu.model", "cpu.vendor", "cpu.family", "cpu.arch")
"""Keys whose difference changes kernels unless the kernel ISA is pinned (portable mode)."""
_INERT = (
    "cpu.count",
    "torch.interop_threads",
    "env.CUDA_VISIBLE_DEVICES",
    "env.NCCL_DEBUG",
    "env.NCCL_SOCKET_IFNAME",
    "gpu.driver",
)
"""Keys that do not change bits on their own (the intra-op thread count is what matters;
logging and network interface choices do not)."""


class Difference(BaseModel):
    """One fingerprint key whose recorded and replaying values differ (None: absent)."""

    model_config = ConfigDict(frozen=True)
    key: str
    recorded: str | None
    replayed: str | None
    explains: bool
    """True when this difference can change the bits (see `compare`)."""


def compare(recorded: Mapping[str, str], here: Mapping[str, str]) -> list[Difference]:
    """The keys on which two fingerprints differ, each marked whether it can explain a drift.

    A key present on one side only counts when both fingerprints are non-empty. CPU model and
    ISA differences can explain drift unless both runs were ``portable`` with the same
    ``torch.cpu_capability`` (then ATen, MKL and oneDNN ran the same pinned code paths).
    """
    if not recorded or not here:
        return []
    pinned = recorded.get("compute.deterministic") == "portable" == here.get(
        "compute.deterministic"
    ) and recorded.get("torch.cpu_capability") == here.get("torch.cpu_capability")
    out = []
    for key in sorted(set(recorded) | set(here)):
        a, b = recorded.get(key), here.get(key)
        if a == b:
            continue
        if key.startswith(_INERT):
            explains = False
        elif key.startswith(_CPU_KERNELS):
            explains = not pinned
        else:
            explains = key.startswith(_EXPLAINS)
        out.append(Difference(key=key, recorded=a, replayed=b, explains=explains))
    return out


def explain(differences: list[Difference]) -> str:
    """One sentence: which differences can explain a drift, or that none can."""
    causes = [d for d in differences if d.explains]
    if not causes:
        return (
            "the replaying host's fingerprint matches the record on every key that selects "
            "kernels: the drift points at nondeterminism (a kernel, a race, an unpinned input)"
        )
    listed = "; ".join(f"{d.key}: {d.recorded or '-'} -> {d.replayed or '-'}" for d in causes)
    return f"the drift can come from these fingerprint differences: {listed}"
