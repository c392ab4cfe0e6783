"""openrelease.layout is the one owner of workspace and bundle paths."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from openrelease import layout

PACKAGE = Path(layout.__file__).parent
NAMES = {
    "artifacts",
    "checkpoints",
    "states",
    "step-",
    "MANIFEST.json",
    "manifest.json",
    "record.json",
    "metrics.jsonl",
    "meta.json",
    "state.json",
    "certificate.json",
}
"""Path segments of the workspace and bundle layouts."""
PIECE = re.compile(r"(?:^|/)(?:artifacts|checkpoints|states)/$|(?:^|/)step-$")
"""An f-string piece that builds a path: ``f"artifacts/{stage}"``, ``f"{dir}/step-{n}"``."""
PATTERN = re.compile(r"step-(?:\\d|\(|\[)")
"""A regex that parses a step folder: ``step-(\\d+)``."""


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (module, class, function, attribute)."""
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                found.add(id(stmt.value))
    return found


FOREIGN = {("openrelease/data/importers.py", "state.json")}
"""Names from other tools' layouts: Hugging Face datasets' save_to_disk folder."""


def _spelled_paths(path: Path) -> list[str]:
    """Path segments spelled in code (messages that mention a file by name are prose)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    pieces = {
        id(v)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for v in node.values
        if isinstance(v, ast.Constant)
    }
    keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys}
    where = path.relative_to(PACKAGE.parent).as_posix()
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
            continue
        if id(node) in docs or id(node) in keys or (where, node.value) in FOREIGN:
            continue
        value = node.value
        if (
            value.strip("/") in NAMES
            or (id(node) in pieces and PIECE.search(value))
            or PATTERN.search(value)
        ):
            hits.append(f"{where}:{node.lineno}: {value!r}")
    return hits


def test_no_module_but_layout_spells_a_workspace_or_bundle_path() -> None:
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p != Path(layout.__file__)]
    hits = [hit for p in modules for hit in _spelled_paths(p)]
    assert hits == []


@pytest.mark.parametrize(("name", "step"), [("step-0", 0), ("step-200", 200)])
def test_step_names_round_trip(name: str, step: int) -> None:
    assert layout.step_name(step) == name
    assert layout.step_of(name) == step


@pytest.mark.parametrize("name", ["step-", "step-1a", "steps-1", "1", ".tmp-step-3", "step--1"])
def test_other_names_are_not_steps(name: str) -> None:
    assert layout.step_of(name) is None


def test_workspace_and_bundle_paths(tmp_path: Path) -> None:
    ws = layout.Workspace(tmp_path)
    assert ws.checkpoint("sft", 30) == tmp_path / "artifacts/sft/checkpoints/step-30"
    assert ws.state("grpo", 10) == tmp_path / "artifacts/grpo/states/step-10"
    assert ws.eval_result("sft", 30) == tmp_path / "artifacts/eval/results/sft/step-30.json"
    assert layout.bundle_checkpoint_rel("sft", 30) == "checkpoints/sft/step-30"
    bundle = layout.Bundle(tmp_path)
    assert not bundle.is_bundle()
    bundle.manifest.write_text("{}")
    bundle.params.parent.mkdir()
    bundle.params.write_text("seed: 1\n")
    assert bundle.is_bundle()
