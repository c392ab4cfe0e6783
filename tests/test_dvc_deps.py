"""dvc.yaml's code deps follow the code: each stage depends on every module its code imports.

A stage whose code imports a module its deps do not cover would report "up to date" after an
edit to that module: stale results presented as current. The import closure comes from grimp
(import-linter's graph, function-level imports included).
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest
import yaml
from project_paths import REPO_ROOT

PACKAGE = "openrelease"
ENTRIES = {
    "data": ("openrelease.data.stage",),
    "pretrain": ("openrelease.train", "openrelease.train.launch"),
    "sft": ("openrelease.train", "openrelease.train.launch"),
    "distill": ("openrelease.train", "openrelease.train.launch"),
    "grpo": ("openrelease.train", "openrelease.train.launch"),
    "eval": ("openrelease.eval.stage",),
    "bundle": ("openrelease.release.bundle",),
    "audit": ("openrelease.audit.report",),
}
"""The library entry point of each stage's command (the CLI layer only parses and prints)."""


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(PACKAGE)


def _file(module: str) -> Path:
    path = REPO_ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _closure(graph: grimp.ImportGraph, entries: tuple[str, ...]) -> set[Path]:
    modules = set(entries)
    for entry in entries:
        modules |= {m for m in graph.find_upstream_modules(entry) if m.startswith(PACKAGE)}
    return {_file(m) for m in modules}


def _code_deps(stage: dict[str, list[str | dict[str, object]]]) -> list[Path]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return [REPO_ROOT / d for d in deps if d == PACKAGE or d.startswith(PACKAGE + "/")]


def _covered(path: Path, deps: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in deps)


STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_every_stage_has_an_entry() -> None:
    assert set(STAGES) == set(ENTRIES)


@pytest.mark.parametrize("stage", sorted(ENTRIES))
def test_deps_cover_the_import_closure(graph: grimp.ImportGraph, stage: str) -> None:
    deps = _code_deps(STAGES[stage])
    missing = sorted(
        p.relative_to(REPO_ROOT).as_posix()
        for p in _closure(graph, ENTRIES[stage])
        if not _covered(p, deps)
    )
    assert missing == [], f"dvc.yaml stage {stage} lacks deps on {missing}"


@pytest.mark.parametrize("stage", sorted(ENTRIES))
def test_deps_name_only_code_the_stage_runs(graph: grimp.ImportGraph, stage: str) -> None:
    """No dep outside the closure: an unrelated edit must not rerun training."""
    closure = _closure(graph, ENTRIES[stage])
    unused = [
        d.relative_to(REPO_ROOT).as_posix()
        for d in _code_deps(STAGES[stage])
        if not any(p == d or p.is_relative_to(d) for p in closure)
    ]
    assert unused == [], f"dvc.yaml stage {stage} depends on code it never imports: {unused}"


def test_a_missing_dep_is_caught(graph: grimp.ImportGraph) -> None:
    """The check itself: drop the data-order module from pretrain's deps and it is named."""
    closure = _closure(graph, ENTRIES["pretrain"])
    order = REPO_ROOT / "openrelease/data/order.py"
    assert order in closure
    deps = [d for d in _code_deps(STAGES["pretrain"]) if d != order]
    assert not _covered(order, deps)
