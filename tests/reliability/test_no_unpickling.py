"""No code path unpickles an input: every deserialising call site is listed here with its reason.

The package is scanned with `ast` for every call that can unpickle (pickle and its cousins,
``torch.load``, torch.distributed.checkpoint loads, ``np.load``, transformers ``from_pretrained``).
Each site must be in ALLOWED (module, call) with a reason saying why its file is trusted or
pickle-free, and must pass the safe flags (``weights_only=True``, ``allow_pickle=False``,
``use_safetensors=True``). A new site fails this test until it is reviewed and listed; a listed
site that went away fails it too, so the list stays the truth.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import openrelease

PACKAGE = Path(openrelease.__file__).parent
PICKLE_MODULES = frozenset(
    {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
)
"""Modules whose loaders run code by design; none may be imported at all."""

ALLOWED: dict[tuple[str, str], str] = {
    ("train/checkpoint.py", "dcp_load"): (
        "resume from this workspace's own DCP state (written by save_state in this workspace); "
        "a bundle's states are never DCP: reproduce refuses them before anything runs"
    ),
    ("train/checkpoint.py", "torch.load"): (
        "this workspace's own per-rank RNG file, written by save_state; weights_only=True"
    ),
    ("train/portable.py", "_load_state_dict"): (
        "export_state converts this workspace's own DCP state into the pickle-free form a "
        "bundle ships; it never reads a bundle"
    ),
    ("train/portable.py", "torch.load"): (
        "export_state reads this workspace's own RNG files; weights_only=True"
    ),
    ("data/store.py", "np.load"): "uint8/int32 token shards, allow_pickle=False (mmap only)",
    ("data/pack.py", "np.load"): (
        "the data stage's own resume file (the token carry between shards, checked against the "
        "sha256 its progress record holds), allow_pickle=False"
    ),
    ("train/model.py", "AutoModelForCausalLM.from_pretrained"): (
        "a base model folder (Hub files each checked against the Hub's digests, or a local "
        "folder): safetensors only (use_safetensors=True), remote code off"
    ),
    ("train/export.py", "AutoTokenizer.from_pretrained"): (
        "the data stage's tokenizer folder: tokenizer.json and JSON configs only (a fast "
        "tokenizer; remote code stays off)"
    ),
    ("train/distill.py", "AutoModelForCausalLM.from_pretrained"): (
        "a local teacher model folder: safetensors only (use_safetensors=True)"
    ),
    ("eval/stage.py", "AutoModelForCausalLM.from_pretrained"): (
        "a release checkpoint: safetensors only (use_safetensors=True)"
    ),
    ("eval/harness.py", "AutoModelForCausalLM.from_pretrained"): (
        "any checkpoint folder `openrelease eval --checkpoint` is given: safetensors only "
        "(use_safetensors=True), so a pickled pytorch_model.bin is never read"
    ),
    ("eval/harness.py", "AutoTokenizer.from_pretrained"): (
        "tokenizer.json and JSON configs only (a fast tokenizer; remote code stays off)"
    ),
    ("train/stages.py", "AutoTokenizer.from_pretrained"): (
        "tokenizer.json and JSON configs only (a fast tokenizer; remote code stays off)"
    ),
    ("train/distill.py", "AutoTokenizer.from_pretrained"): (
        "tokenizer.json and JSON configs only (a fast tokenizer; remote code stays off)"
    ),
    ("eval/stage.py", "AutoTokenizer.from_pretrained"): (
        "tokenizer.json and JSON configs only (a fast tokenizer; remote code stays off)"
    ),
}

REQUIRED_KEYWORDS = {
    "torch.load": ("weights_only", True),
    "np.load": ("allow_pickle", False),
    "AutoModelForCausalLM.from_pretrained": ("use_safetensors", True),
}
FORBIDDEN_KEYWORDS = {"AutoTokenizer.from_pretrained": "trust_remote_code"}
LOADERS = frozenset(
    {
        "torch.load",
        "torch.jit.load",
        "dcp_load",
        "_load_state_dict",
        "dcp.load",
        "np.load",
        "numpy.load",
        "AutoModelForCausalLM.from_pretrained",
        "AutoModel.from_pretrained",
        "AutoTokenizer.from_pretrained",
        "AutoConfig.from_pretrained",
        "load_from_disk",
    }
)


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _sites() -> tuple[dict[tuple[str, str], list[ast.Call]], list[str]]:
    """Every loader call by (module, callee), and every import of a pickle module."""
    calls: dict[tuple[str, str], list[ast.Call]] = {}
    imports: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module:
                    names.append(node.module)
                imports += [f"{rel}: {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                if name in LOADERS or name.endswith(".from_pretrained"):
                    calls.setdefault((rel, name), []).append(node)
    return calls, imports


def test_no_module_imports_pickle_or_its_cousins() -> None:
    assert _sites()[1] == []


def test_every_deserialising_call_site_is_listed_with_a_reason() -> None:
    calls, _ = _sites()
    assert sorted(calls) == sorted(ALLOWED), "review the new or removed site, then update ALLOWED"
    assert all(len(reason) > 30 for reason in ALLOWED.values())


@pytest.mark.parametrize(("callee", "flag"), sorted(REQUIRED_KEYWORDS.items()))
def test_every_site_passes_the_safe_flag(callee: str, flag: tuple[str, bool]) -> None:
    calls, _ = _sites()
    sites = [c for (_, name), found in calls.items() if name == callee for c in found]
    assert sites, f"no {callee} left: drop it from REQUIRED_KEYWORDS"
    keyword, value = flag
    for call in sites:
        given = {k.arg: k.value for k in call.keywords}
        assert keyword in given, f"{callee} at line {call.lineno} lacks {keyword}={value}"
        constant = given[keyword]
        assert isinstance(constant, ast.Constant) and constant.value is value, call.lineno


def test_no_tokenizer_load_trusts_remote_code() -> None:
    calls, _ = _sites()
    for (rel, name), found in calls.items():
        forbidden = FORBIDDEN_KEYWORDS.get(name)
        for call in found:
            assert forbidden not in {k.arg for k in call.keywords}, f"{rel}:{call.lineno}"
