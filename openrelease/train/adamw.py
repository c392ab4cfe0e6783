"""AdamW for CPU training whose bits do not depend on the CPU vendor.

This is ``torch.optim.AdamW`` but for one operation: the square root of the second moment. On
CPU, ``Tensor.sqrt`` goes to MKL's vector math library (VML, ``vsSqrt``), which MKL dispatches
by CPU vendor whatever ``MKL_CBWR`` says: on AMD it always runs its generic kernel
(``mkl_vml_kernel_sSqrt_EXHAynn``; gdb on an EPYC Zen 5 under ``MKL_CBWR`` ``COMPATIBLE``,
``AUTO`` and ``AVX2``). That kernel starts from ``rsqrtps``, an approximate reciprocal square
root whose error the x86 manuals bound but whose bits they leave to the implementation, so
Intel and AMD CPUs start from different approximations and can end on different last bits. Nor
is it correctly rounded: for the second moments of one AdamW step on gradients of about 1e-3,
17.2 % of its results differ from IEEE sqrt on the Zen 5 (tests/test_adamw.py measures this),
and 17 % did in a like probe on an Intel Xeon (family 6 model 167) under ``COMPATIBLE``. It is
the one VML call in the tiny recipe's training step (39 a step), and with it the golden digests
made on the Zen 5 did not hold on that Xeon.

IEEE 754 requires sqrt to be correctly rounded, and every x86 ``sqrtps`` / ``vsqrtps`` is, so
NumPy's ``np.sqrt`` (those instructions, on the tensor's own memory) gives the one right answer
on every CPU. Everything else is torch's single-tensor AdamW op for op (decoupled weight decay,
``lerp_`` for the first moment, ``addcmul_`` for the second, bias corrections in Python floats,
``addcdiv_``), with the same state (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints, DCP
and resume see a ``torch.optim.AdamW``. No amsgrad, maximize, capturable or differentiable: the
trainer uses none of them. CUDA keeps torch's fused AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's values (a DTensor's shard is a view of its storage)."""
    return t.to_local() if isinstance(t, DTensor) else t


def ieee_sqrt(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded elementwise sqrt of a CPU float tensor, the same bits on every CPU."""
    if t.device.type != "cpu":
        raise ValueError(f"ieee_sqrt takes CPU tensors, not {t.device.type}")
    return torch.from_numpy(np.sqrt(t.detach().contiguous().numpy()))


@dataclass(frozen=True)
class _Hyper:
    """One param group's hyperparameters as Python floats (as torch's AdamW uses them)."""

    lr: float
    eps: float
    weight_decay: float
    beta1: float
    beta2: float


class PortableAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose second-moment sqrt is IEEE on every CPU (module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(
            params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, foreach=False
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One AdamW update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = _Hyper(
                lr=float(group["lr"]),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                beta1=float(group["betas"][0]),
                beta2=float(group["betas"][1]),
            )
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, param.grad, hyper)
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, h: _Hyper) -> None:
        if grad.is_sparse or param.is_complex():
            raise ValueError("PortableAdamW takes dense real parameters")
        state = self.state[param]
        if not state:  # what torch's AdamW makes on the first step
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        p, grad = _local(param), _local(grad)
        exp_avg, exp_avg_sq = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
        state["step"] += 1
        step = float(state["step"].item())
        if h.weight_decay != 0:
            p.mul_(1 - h.lr * h.weight_decay)
        exp_avg.lerp_(grad, 1 - h.beta1)
        exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, value=1 - h.beta2)
        step_size = h.lr / (1 - h.beta1**step)
        bias_correction2_sqrt = (1 - h.beta2**step) ** 0.5
        denom = (ieee_sqrt(exp_avg_sq).view_as(exp_avg_sq) / bias_correction2_sqrt).add_(h.eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
