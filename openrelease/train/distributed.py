"""Process groups, determinism settings, FSDP2 sharding and the rank-0 log filter.

gloo on CPU, NCCL on CUDA; one code path for every world size (1 included).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from openrelease.errors import OpenReleaseError, ParamsError
from openrelease.params import ComputeParams, TrainStageParams
from openrelease.record.fingerprint import cpu_fingerprint
from openrelease.train.launch import PORTABLE_CPU_ENV, pin_environment
from openrelease.train.model import decoder_layers

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    checkpoint_group: dist.ProcessGroup | None = None
    """A gloo group for background (async) DCP saves on CUDA, apart from NCCL training traffic."""

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the only rank that logs and writes shared files."""
        return self.rank == 0


class RankZeroFilter(logging.Filter):
    """Drop log records on every rank but 0 (warnings and errors pass everywhere)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record on rank 0, or when it is a warning or worse."""
        return self.rank == 0 or record.levelno >= logging.WARNING


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun or Slurm variables; (0, 1, 0) otherwise."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
    return 0, 1, 0


def check_world(stage: TrainStageParams, *, name: str, world_size: int) -> None:
    """Fail fast when a stage's batch does not split over ``world_size`` ranks.

    Raises:
        ParamsError: global_batch_size is not a multiple of micro_batch_size x world size.
    """
    if stage.global_batch_size % (stage.micro_batch_size * world_size):
        raise ParamsError(
            f"{name}.global_batch_size {stage.global_batch_size} must be a multiple of "
            f"micro_batch_size x world size = {stage.micro_batch_size} x {world_size}; "
            "change the batch sizes or the number of processes."
        )


def resolve_device(compute: ComputeParams) -> torch.device:
    """Cuda under ``auto`` when available, else cpu; ``cuda`` without a GPU is a ParamsError."""
    if compute.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("compute.device is cuda but no GPU is visible; set it to auto or cpu.")
    if compute.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def apply_determinism(compute: ComputeParams, *, device: torch.device) -> None:
    """Pin the thread count and, unless ``compute.deterministic`` is false, deterministic kernels.

    ``portable`` also needs the CPU kernel ISA of `openrelease.train.launch.PORTABLE_CPU_ENV`:
    `openrelease launch` and `openrelease train` set it before torch starts; here it is set
    again (it still takes effect while torch has run no op) and checked.

    Raises:
        ParamsError: ``portable``, but this process already runs other CPU kernels.
    """
    torch.set_num_threads(compute.num_threads)
    mode = compute.determinism
    if mode == "false":
        return
    pin_environment(compute)
    if mode == "portable":
        check_portable_kernels()
    if device.type == "cuda":  # pin_environment set CUBLAS_WORKSPACE_CONFIG (CUDA_ENV)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")


def check_portable_kernels() -> None:
    """Fail unless torch dispatches to the portable CPU kernel ISA (AVX2) on a CPU that has it.

    Raises:
        ParamsError: torch chose its kernels before the pin was set (another ISA runs).
    """
    want = PORTABLE_CPU_ENV["ATEN_CPU_CAPABILITY"].upper()
    have = str(torch.backends.cpu.get_cpu_capability())
    has_avx2 = "avx2" in cpu_fingerprint()["cpu.isa"].split(",")
    if have != want and has_avx2:  # without AVX2 (arm64, POWER, old x86) the pin is moot
        raise ParamsError(
            f"compute.deterministic is portable but this process already runs {have} CPU "
            f"kernels; start it with ATEN_CPU_CAPABILITY={want.lower()} (openrelease launch "
            "does), or set compute.deterministic: true."
        )


def init_distributed(compute: ComputeParams) -> DistContext:
    """Join (or create) the default process group and build a 1-D device mesh.

    Without launcher variables this is a single process: a group of size 1 on a local store.
    """
    rank, world_size, local_rank = env_world()
    device = resolve_device(compute)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    apply_determinism(compute, device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=30)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ or "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        elif world_size > 1:
            if not compute.rdzv_endpoint:
                raise ParamsError("srun launches need compute.rdzv_endpoint (host:port).")
            dist.init_process_group(
                backend,
                init_method=f"tcp://{compute.rdzv_endpoint}",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        else:
            # A private store on an ephemeral port: public API on every torch version.
            dist.init_process_group(
                backend, init_method="tcp://127.0.0.1:0", rank=0, world_size=1, timeout=timeout
            )
    mesh = init_device_mesh(device.type, (world_size,))
    group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return DistContext(rank, world_size, local_rank, device, mesh, group)


def teardown() -> None:
    """Leave the process group (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def use_bf16(compute: ComputeParams, *, device: torch.device) -> bool:
    """bf16 parameters in compute: explicit ``bf16``, or ``auto`` on CUDA."""
    return compute.precision == "bf16" or (compute.precision == "auto" and device.type == "cuda")


def shard_model(
    model: torch.nn.Module, ctx: DistContext, compute: ComputeParams
) -> torch.nn.Module:
    """Apply activation checkpointing, torch.compile and FSDP2 (per decoder layer, then root).

    The model must hold identical full weights on every rank (same seed or same checkpoint).
    """
    if compute.activation_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ParamsError("activation_checkpointing needs a transformers model.")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = MixedPrecisionPolicy()
    if use_bf16(compute, device=ctx.device):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model.to(ctx.device)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if compute.compile:
            layer.compile()
        # The last layer's params are needed right away by backward: keep them gathered.
        fully_shard(layer, mesh=ctx.mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
    return model


def _training_resharding(model: torch.nn.Module) -> None:
    """The policy `shard_model` sets: reshard every layer but the last; keep the root gathered."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, FSDPModule):
            layer.set_reshard_after_forward(i < len(layers) - 1, recurse=False)
    if isinstance(model, FSDPModule):
        model.set_reshard_after_forward(False, recurse=False)


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Keep a sharded model's weights gathered across forwards (token-by-token generation).

    On exit the training policy is restored and the weights are sharded again. A plain
    (unsharded) model passes through unchanged.
    """
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        _training_resharding(model)
        reshard(model)


def reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP unit (after forwards with no backward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class RankFailedError(OpenReleaseError):
    """Work that rank 0 did for every rank failed there; the message carries its error."""


def run_on_main(ctx: DistContext, fn: Callable[[], object]) -> None:
    """Run ``fn`` on rank 0 while the others wait; if it fails, every rank raises.

    Raises:
        Exception: On rank 0, whatever ``fn`` raised.
        RankFailedError: On the other ranks, when ``fn`` failed on rank 0.
    """
    error: Exception | None = None
    if ctx.is_main:
        try:
            fn()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RankFailedError(f"rank 0 failed: {message[0]}")


def main_result(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its (picklable, trusted) result to every rank.

    Raises:
        Exception: On rank 0, whatever ``fn`` raised.
        RankFailedError: On the other ranks, when ``fn`` failed on rank 0.
    """
    box: list[object] = [None]

    def run() -> None:
        box[0] = fn()

    run_on_main(ctx, run)
    dist.broadcast_object_list(box, src=0)
    result: T = box[0]  # type: ignore[assignment]
    return result
