"""PortableAdamW: torch's AdamW, but with a sqrt whose bits are the same on every CPU.

The training step must not reach an MKL vector-math kernel built on an approximate instruction
(``rsqrtps``, ``rcpps`` and their AVX-512 forms): their bits differ between CPU vendors. In this
torch build those instructions appear in libtorch_cpu only inside MKL (VML, sparse BLAS,
LAPACK), and among the VML functions ATen calls for float32 only in sqrt, log10 and log2
(`objdump -d libtorch_cpu.so`, every function holding one of them; AMD EPYC Zen 5, 2026-12-04).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from openrelease.params import ModelParams
from openrelease.train.adamw import PortableAdamW, ieee_sqrt
from openrelease.train.dpo import preference_loss
from openrelease.train.model import SpecialTokens, build_model
from openrelease.train.objective import optimizer_step
from openrelease.train.rl import clipped_objective, group_advantages, k3_kl

APPROXIMATE_VML_OPS = {"sqrt", "log10", "log2"}
"""aten ops whose float CPU kernel is an MKL VML function holding rsqrt/rcp instructions."""
HYPER: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}


def _grads(n: int, steps: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):  # gradients of the size a small model sees (second moments ~1e-8)
        yield torch.randn(n, generator=g) * 1e-3


def test_each_update_is_torch_adamw_wherever_mkl_sqrt_is_ieee() -> None:
    """Step k of both from the same state: equal except where torch's own sqrt was not IEEE."""
    ours = torch.nn.Parameter(torch.randn(50_000, generator=torch.Generator().manual_seed(0)))
    portable = PortableAdamW([ours], **HYPER)
    misrounded_total = 0
    for grad in _grads(ours.numel(), steps=3):
        theirs = torch.nn.Parameter(ours.detach().clone())
        reference = torch.optim.AdamW([theirs], **HYPER, foreach=False)
        if portable.state:
            reference.load_state_dict(copy.deepcopy(portable.state_dict()))  # shares tensors
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        portable.step()
        reference.step()
        v = portable.state[ours]["exp_avg_sq"]
        assert torch.equal(v, reference.state[theirs]["exp_avg_sq"])
        assert torch.equal(portable.state[ours]["exp_avg"], reference.state[theirs]["exp_avg"])
        misrounded = torch.sqrt(v) != ieee_sqrt(v)
        misrounded_total += int(misrounded.sum())
        differs = ours.detach() != theirs.detach()
        assert not (differs & ~misrounded).any(), "an update moved where the sqrt agreed"
        close = torch.allclose(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)
        assert close, "an update moved by more than a last-bit sqrt difference explains"
    assert portable.state[ours]["step"].item() == 3.0
    if torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]  # else IEEE: equal
        assert misrounded_total > 0, "MKL's sqrt was IEEE throughout: this test no longer tests"


def test_state_is_torch_adamw_state() -> None:
    """Checkpoints, DCP and resume see the state torch's AdamW keeps."""
    ours, theirs = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    a, b = PortableAdamW([ours], **HYPER), torch.optim.AdamW([theirs], **HYPER)
    ours.grad, theirs.grad = torch.full((8,), 0.5), torch.full((8,), 0.5)
    a.step()
    b.step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"][0].keys() == sb["state"][0].keys()
    for key, value in sb["state"][0].items():
        assert sa["state"][0][key].dtype == value.dtype and sa["state"][0][key].shape == value.shape
    assert {k: v for k, v in sa["param_groups"][0].items() if k != "foreach"} == {
        k: v for k, v in sb["param_groups"][0].items() if k != "foreach"
    }
    torch.optim.AdamW([theirs], **HYPER).load_state_dict(sa)  # and it loads back


def test_ieee_sqrt_is_correctly_rounded() -> None:
    """float64 sqrt rounded to float32 is the correctly rounded float32 sqrt (53 >= 2*24 + 2)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(200_000, generator=g) * torch.exp2(
        torch.randint(-60, 60, (200_000,), generator=g)
    )
    x = torch.cat([x, torch.tensor([0.0, 1.0, 4.0, float("inf")])])
    exact = torch.from_numpy(np.sqrt(x.double().numpy()).astype(np.float32))
    assert torch.equal(ieee_sqrt(x), exact)


class _AtenOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Records the aten op of every call (``sqrt`` for ``aten.sqrt.default``)."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(func._schema.name.split("::")[1].rstrip("_"))
        return func(*args, **(kwargs or {}))


def _ops_of(fn: Callable[[], object]) -> set[str]:
    mode = _AtenOps()
    with mode:
        fn()
    return mode.ops


def _tiny_step(optimizer_class: type[torch.optim.Optimizer]) -> Callable[[], object]:
    torch.manual_seed(0)
    params = ModelParams.model_validate(
        {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
         "intermediate_size": 64, "max_position_embeddings": 64}
    )  # fmt: skip
    model = build_model(params, vocab_size=96, special=SpecialTokens(0, 1, 2))
    optimizer = optimizer_class(model.parameters(), **HYPER)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, 96), ids[:, 1:].reshape(-1))
        loss.backward()  # type: ignore[no-untyped-call]
        return optimizer_step(model, optimizer, grad_clip=1.0)

    return step


def test_a_training_step_reaches_no_approximate_mkl_kernel() -> None:
    """Forward, backward, clipping and the optimizer of a tiny Llama step; the probe sees sqrt."""
    assert "sqrt" in _ops_of(_tiny_step(torch.optim.AdamW))  # what the probe exists to catch
    ops = _ops_of(_tiny_step(PortableAdamW))
    assert {"mm", "addcdiv", "lerp"} <= ops  # the probe saw the step
    assert not ops & APPROXIMATE_VML_OPS, sorted(ops & APPROXIMATE_VML_OPS)


@pytest.mark.parametrize("loss", ["grpo", "dpo", "ipo"])
def test_stage_losses_reach_no_approximate_mkl_kernel(loss: str) -> None:
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 5, generator=g, requires_grad=True)

    def run() -> None:
        if loss == "grpo":
            adv = group_advantages(torch.rand(8, generator=g), group_size=4)
            old = logp.detach() + 0.01
            total = clipped_objective(logp, old, adv, 0.2) + 0.1 * k3_kl(logp, old)
        else:
            seq = logp.sum(dim=1)
            terms = preference_loss(
                seq[:4], seq[4:], seq[:4].detach() + 0.1, seq[4:].detach(), beta=0.1,
                loss_type="sigmoid" if loss == "dpo" else "ipo",
                chosen_tokens=torch.full((4,), 5), rejected_tokens=torch.full((4,), 5),
            )  # fmt: skip
            total = terms.losses
        total.sum().backward()  # type: ignore[no-untyped-call]

    ops = _ops_of(run)
    assert not ops & APPROXIMATE_VML_OPS, sorted(ops & APPROXIMATE_VML_OPS)
