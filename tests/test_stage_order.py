"""verify and publish order a release's stages as its own params list them (custom names)."""

from __future__ import annotations

from pathlib import Path

import yaml

from openrelease.digest import sha256_tree
from openrelease.manifest import CheckpointMeta, FileEntry
from openrelease.verify.bundle import (
    STAGE_ORDER,
    CheckpointView,
    VerifyReport,
    bundle_stage_order,
    check_lineage,
    stage_key,
)


def _view(stage: str, step: int, parent: str | None, weights: str) -> CheckpointView:
    files = {"model.safetensors": (10, weights)}
    meta = CheckpointMeta(
        stage=stage,
        step=step,
        tokens_seen=step,
        samples_seen=step,
        sample_range=(0, step),
        data_digest="sha256:data",
        loss=None,
        params_digest="sha256:params",
        parent_digest=parent,
        files=(FileEntry(path="model.safetensors", size=10, sha256=weights),),
        checkpoint_digest=sha256_tree({"model.safetensors": weights}),
    )
    return CheckpointView(stage, step, f"checkpoints/{stage}/step-{step}", meta, files)


def _chain() -> list[CheckpointView]:
    """zbase (a pretrain kind) then chat (sft from zbase): alphabetical order is the reverse."""
    base = _view("zbase", 2, None, "sha256:w1")
    assert base.meta is not None
    chat = _view("chat", 2, base.meta.checkpoint_digest, "sha256:w2")
    return [chat, base]


def _params(bundle: Path, stages: object) -> None:
    (bundle / "configs").mkdir(parents=True, exist_ok=True)
    (bundle / "configs/params.yaml").write_text(yaml.safe_dump({"seed": 1, "stages": stages}))


def test_custom_stage_names_follow_the_bundles_stage_list(tmp_path: Path) -> None:
    _params(tmp_path, [{"name": "zbase", "kind": "pretrain"}, {"name": "chat", "kind": "sft"}])
    order = bundle_stage_order(tmp_path)
    assert order == ("zbase", "chat")
    assert sorted(["chat", "zbase"], key=lambda s: stage_key(s, order)) == ["zbase", "chat"]
    ok = VerifyReport(target="t")
    check_lineage(_chain(), ok, order)
    assert ok.problems == []
    # Without the list (the default chain, then names alphabetically) chat would come first
    # and its parent, a zbase checkpoint, would look like a later stage's.
    wrong = VerifyReport(target="t")
    check_lineage(_chain(), wrong)
    assert [p.code for p in wrong.problems] == ["parent_chain"]


def test_unreadable_or_odd_stage_lists_fall_back_to_the_default_chain(tmp_path: Path) -> None:
    assert bundle_stage_order(tmp_path) == STAGE_ORDER  # no configs/params.yaml
    for stages in (None, "pretrain", [{"name": 3}], [{"name": "a"}, {"name": "a"}], ["sft"]):
        _params(tmp_path, stages)
        assert bundle_stage_order(tmp_path) == STAGE_ORDER, stages
    (tmp_path / "configs/params.yaml").write_text("a: &x [1]\nb: *x\n")  # aliases are refused
    assert bundle_stage_order(tmp_path) == STAGE_ORDER
    real = tmp_path / "elsewhere.yaml"
    real.write_text(yaml.safe_dump({"stages": [{"name": "zbase"}]}))
    (tmp_path / "configs/params.yaml").unlink()
    (tmp_path / "configs/params.yaml").symlink_to(real)  # never followed out of the bundle
    assert bundle_stage_order(tmp_path) == STAGE_ORDER
