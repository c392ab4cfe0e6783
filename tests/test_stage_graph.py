"""The stage graph in params (`stages:`) and the dvc.yaml generated from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from project_paths import TEST_PARAMS
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.errors import ParamsError
from openrelease.params import STAGES, SFTParams, load_params, validate_params
from openrelease.pipeline import check_pipeline, pipeline_spec, render, sync_pipeline


def _raw() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(TEST_PARAMS.read_text(encoding="utf-8"))
    return raw


def _with_stages(stages: list[dict[str, str]], **sections: dict[str, Any]) -> dict[str, Any]:
    raw = _raw()
    raw["stages"] = stages
    raw.update(sections)
    return raw


def test_params_without_stages_keep_the_old_chain() -> None:
    raw = _raw()
    del raw["stages"], raw["dpo"]  # a params file written before the stage graph
    params = validate_params(raw, source="old.yaml")
    assert params.train_stages == STAGES
    assert [(s.kind, s.from_) for s in params.stages] == [
        ("pretrain", "scratch"),
        ("sft", "pretrain"),
        ("distill", "sft"),
        ("grpo", "distill"),
    ]
    dumped = params.model_dump(mode="json")
    assert dumped["stages"][1] == {"name": "sft", "kind": "sft", "from": "pretrain"}
    assert validate_params(dumped, source="dumped") == params


def test_a_repeated_kind_gets_its_own_section_validated_by_the_kind() -> None:
    raw = _raw()
    stages = [
        {"name": "pretrain", "kind": "pretrain"},
        {"name": "sft", "kind": "sft"},
        {"name": "sft2", "kind": "sft"},
    ]
    params = validate_params(_with_stages(stages, sft2={**raw["sft"], "lr": 5e-4}), source="p.yaml")
    assert params.train_stages == ("pretrain", "sft", "sft2")
    assert params.parent_stage("sft2") == "sft"  # `from` defaults to the previous stage
    section = params.stage("sft2")
    assert isinstance(section, SFTParams) and section.lr == 5e-4
    assert params.model_dump(mode="json")["sft2"]["min_lr_ratio"] == 0.1  # defaults filled in
    with pytest.raises(ParamsError, match=r"^p\.yaml: sft2\.lr: Input should be greater than 0"):
        validate_params(_with_stages(stages, sft2={**raw["sft"], "lr": -1}), source="p.yaml")
    with pytest.raises(ParamsError, match=r"sft2: required key is missing \(stage sft2\)"):
        validate_params(_with_stages(stages), source="p.yaml")


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            {"name": "sft", "kind": "sft", "from": "grpo"},
            "stages: sft starts from 'grpo', which is not an earlier stage",
        ),
        (
            {"name": "sft", "kind": "sft", "from": "hf:Org/name"},
            "from 'hf:Org/name' is not a Hub base model reference; write hf:ORG/NAME@REVISION",
        ),
        (
            {"name": "grpo", "kind": "grpo", "from": "scratch"},
            "grpo (kind grpo) cannot start from scratch",
        ),
        (
            {"name": "sft", "kind": "grpo"},
            "a stage named after a kind must be of that kind",
        ),
        ({"name": "eval", "kind": "sft"}, "stage name 'eval' is reserved"),
        ({"name": "pretrain", "kind": "pretrain"}, "'pretrain' is listed twice"),
    ],
)
def test_a_bad_stage_graph_is_one_line(second: dict[str, str], message: str) -> None:
    raw = _with_stages([{"name": "pretrain", "kind": "pretrain"}, second])
    with pytest.raises(ParamsError) as exc:
        validate_params(raw, source="p.yaml")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_section_no_stage_names_is_refused() -> None:
    raw = _raw() | {"sft3": _raw()["sft"]}
    with pytest.raises(ParamsError, match=r"sft3: unknown key \(not a params section nor a stage"):
        validate_params(raw, source="p.yaml")


def test_skipped_stages_leave_their_sections_unused() -> None:
    raw = _with_stages([{"name": "pretrain", "kind": "pretrain"}, {"name": "sft", "kind": "sft"}])
    params = validate_params(raw, source="p.yaml")
    assert params.train_stages == ("pretrain", "sft")
    with pytest.raises(ParamsError, match="'grpo' is not a training stage of these params"):
        params.stage("grpo")


def test_dvc_yaml_follows_the_graph() -> None:
    raw = _raw()
    stages = [
        {"name": "pretrain", "kind": "pretrain"},
        {"name": "sft", "kind": "sft"},
        {"name": "distill", "kind": "distill", "from": "pretrain"},
        {"name": "sft2", "kind": "sft", "from": "./models/base"},
    ]
    params = validate_params(_with_stages(stages, sft2=raw["sft"]), source="p.yaml")
    spec = pipeline_spec(params)["stages"]
    assert list(spec) == ["data", "pretrain", "sft", "distill", "sft2", "eval", "bundle", "audit"]
    assert spec["distill"]["deps"] == [
        ".openrelease/code.json",
        "artifacts/data/manifest.json",
        "artifacts/pretrain/manifest.json",
    ]
    assert spec["sft2"]["deps"][-1] == "models/base"
    assert spec["sft2"]["cmd"] == "openrelease launch sft2 --kind sft"
    assert spec["sft2"]["params"] == ["seed", "model", "compute", "sft2"]
    outs = spec["distill"]["outs"]
    assert {"artifacts/distill/traces.jsonl": {"persist": True}} in outs
    assert {"artifacts/distill/checkpoints": {"persist": True}} in outs
    for stage in spec.values():  # every output is cached: nothing says cache: false
        assert "cache" not in yaml.safe_dump(stage)
    assert "artifacts/sft2/manifest.json" in spec["eval"]["deps"]
    assert spec["audit"]["metrics"] == ["artifacts/audit/metrics.json"]
    assert yaml.safe_load(render(params))["stages"] == spec


def test_check_names_the_difference(tmp_path: Path) -> None:
    params = load_params(TEST_PARAMS)
    assert sync_pipeline(tmp_path, params) == ["dvc.yaml", ".openrelease/code.json"]
    assert sync_pipeline(tmp_path, params) == []
    check_pipeline(tmp_path, params)
    dvc = tmp_path / "dvc.yaml"
    edited = yaml.safe_load(dvc.read_text())
    edited["stages"]["sft"]["params"] = ["seed"]
    dvc.write_text(yaml.safe_dump(edited, sort_keys=False))
    with pytest.raises(ParamsError) as exc:
        check_pipeline(tmp_path, params)
    assert str(exc.value) == (
        "dvc.yaml and params.yaml disagree: stage 'sft' params is ['seed'], params.yaml makes it "
        "['seed', 'model', 'compute', 'sft']; run `openrelease pipeline sync` (then `dvc repro`)."
    )
    code = tmp_path / ".openrelease/code.json"
    sync_pipeline(tmp_path, params)
    code.write_text(code.read_text().replace('"sha256:', '"sha256:0'))
    with pytest.raises(ParamsError, match=r"is not the code \.openrelease/code\.json names"):
        check_pipeline(tmp_path, params)


def _params_file(tmp_path: Path, second: dict[str, str], **sections: Any) -> Path:
    raw = _with_stages([{"name": "pretrain", "kind": "pretrain"}, second], **sections)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_dpo_kind_stage_gets_dpo_params_and_an_earlier_reference() -> None:
    from openrelease.params import DPOParams

    raw = _raw()
    second = {"name": "prefs", "kind": "dpo", "from": "pretrain"}
    path_raw = _with_stages(
        [{"name": "pretrain", "kind": "pretrain"}, second], prefs={**raw["dpo"], "beta": 0.3}
    )
    params = validate_params(path_raw, source="p.yaml")
    prefs = params.stage("prefs")
    assert isinstance(prefs, DPOParams) and prefs.beta == 0.3 and prefs.reference is None
    path_raw["prefs"]["reference"] = "pretrain"
    assert validate_params(path_raw, source="p.yaml").stage("prefs") != prefs
    path_raw["prefs"]["reference"] = "sft"  # a section exists, but no such earlier stage
    with pytest.raises(ParamsError, match=r"prefs.reference 'sft' is not a stage that runs before"):
        validate_params(path_raw, source="p.yaml")


def test_a_base_model_on_a_branch_is_refused_in_one_line_unless_floating_is_allowed(
    tmp_path: Path,
) -> None:
    second = {"name": "sft", "kind": "sft", "from": "hf:Org/base-model@v1.0"}
    path = _params_file(tmp_path, second)
    result = CliRunner().invoke(app, ["params", "show", "--params", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "stages: sft from revision 'v1.0' is a branch or tag" in lines[0]
    assert "allow_floating_revision: true" in lines[0]
    raw = yaml.safe_load(path.read_text())
    raw["sft"]["allow_floating_revision"] = True
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_params(path).spec("sft").from_ == "hf:Org/base-model@v1.0"
