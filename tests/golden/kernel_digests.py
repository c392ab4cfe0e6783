"""Digests of the CPU kernels the tiny recipe's training relies on, to say which one moved.

    python tests/golden/kernel_digests.py   # prints {kernel: first 16 hex digits of a sha256}

Run under the portable pins (tests/test_golden.py and regenerate.py start it with
`openrelease.train.launch.launch_env`), one thread. tests/golden/tiny.json keeps the digests
of the machine that made the golden checkpoints under ``kernels``; when a checkpoint digest
does not hold on another CPU, the kernels whose digests differ there are where to look.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from openrelease.params import ModelParams, load_params
from openrelease.train.adamw import PortableAdamW, ieee_sqrt
from openrelease.train.launch import launch_env
from openrelease.train.model import build_model

REPO = Path(__file__).resolve().parent.parent.parent


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def sgemm() -> str:
    """MKL SGEMM in the layouts linear layers use: x @ W.T, and both gradients."""
    x, w, g = _randn(512, 128, seed=1), _randn(344, 128, seed=2), _randn(512, 344, seed=3)
    return _digest(
        x @ w.T, g @ w, g.T @ x, torch.bmm(_randn(8, 64, 32, seed=4), _randn(8, 32, 64, seed=5))
    )


def attention() -> str:
    """Causal scaled-dot-product attention (the CPU flash kernel), forward and backward."""
    q, k, v = (_randn(2, 4, 128, 32, seed=s).requires_grad_() for s in (6, 7, 8))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(_randn(2, 4, 128, 32, seed=9))  # type: ignore[no-untyped-call]
    return _digest(out, *(t.grad for t in (q, k, v) if t.grad is not None))


def elementwise() -> str:
    """What the forward, the losses and GRPO use elementwise (exp is MKL VML's)."""
    x = _randn(100_000, seed=10)
    return _digest(torch.exp(x), F.silu(x), torch.rsqrt(x.abs() + 1e-6))


def cross_entropy() -> str:
    """log-softmax cross-entropy, forward and backward."""
    logits = _randn(256, 512, seed=11).requires_grad_()
    loss = F.cross_entropy(logits, torch.arange(256) % 512)
    loss.backward()  # type: ignore[no-untyped-call]
    assert logits.grad is not None
    return _digest(loss, logits.grad)


def sqrt() -> str:
    """The optimizer's square root (`ieee_sqrt`)."""
    return _digest(ieee_sqrt(_randn(100_000, seed=12).abs() * 1e-6))


def sampling() -> str:
    """Seeded init and sampling: normal_, randint, multinomial (GRPO's rollouts)."""
    torch.manual_seed(13)
    probs = torch.softmax(_randn(64, 512, seed=14), dim=-1)
    picks = torch.multinomial(probs, 4, replacement=True).float()
    return _digest(
        torch.empty(10_000).normal_(0, 0.02), torch.randint(0, 512, (1000,)).float(), picks
    )


def train_steps() -> str:
    """Three steps of a small Llama with PortableAdamW and clipping: all of the above together."""
    torch.manual_seed(0)
    shape = ModelParams(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=172, max_position_embeddings=128,
    )  # fmt: skip
    model = build_model(shape, vocab_size=256)
    opt = PortableAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(15)
    for _ in range(3):
        x = torch.randint(0, 256, (4, 128), generator=gen)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1]
        F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1)).backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _digest(*model.state_dict().values())


KERNELS: dict[str, Callable[[], str]] = {
    f.__name__: f
    for f in (sgemm, attention, elementwise, cross_entropy, sqrt, sampling, train_steps)
}


def digests() -> dict[str, str]:
    """Every kernel's digest, in this process (pins must be set before torch started)."""
    torch.set_num_threads(1)
    return {name: fn() for name, fn in KERNELS.items()}


def under_pins(params_path: Path) -> dict[str, str]:
    """`digests` in a fresh interpreter under the pins of ``params_path`` (set before torch)."""
    env = launch_env(load_params(params_path).compute)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"kernel_digests.py failed:\n{done.stderr[-3000:]}")
    result: dict[str, str] = json.loads(done.stdout)
    return result


if __name__ == "__main__":
    sys.stdout.write(json.dumps(digests(), sort_keys=True) + "\n")
