from __future__ import annotations

import csv
import json
import os
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml

import openrelease
from openrelease.audit.mof import (
    MotDocument,
    is_open_license,
    license_lists,
    load_mot_yaml,
    mof_components,
    mof_release_yaml,
    normalize_license,
    parse_mot_yaml,
    score_licenses,
    score_release,
)
from openrelease.errors import ArtifactError, OpenReleaseError, ParamsError

ASSETS = Path(__file__).parent / "assets" / "mof"


def _rows(sub: str, folder: str) -> list[tuple[Path, dict[str, str]]]:
    with (ASSETS / sub / "expected.csv").open(newline="") as f:
        return [(ASSETS / folder / row["file"], row) for row in csv.DictReader(f)]


CASES = _rows("", "models") + _rows("fixtures", "fixtures")


def test_every_model_and_fixture_has_an_expected_row() -> None:
    listed = {path for path, _ in CASES}
    on_disk = {*ASSETS.glob("models/*.yml"), *ASSETS.glob("fixtures/*.yml")}
    assert listed == on_disk
    assert len(listed) == 205 + 27


@pytest.mark.parametrize(("path", "row"), CASES, ids=[p.name for p, _ in CASES])
def test_score_matches_mot(path: Path, row: dict[str, str]) -> None:
    score = score_release(load_mot_yaml(path))
    assert score.mof_class == int(row["expected_class"])
    assert round(score.class_iii, 4) == pytest.approx(float(row["class_iii_pct"]), abs=1e-9)
    assert round(score.class_ii, 4) == pytest.approx(float(row["class_ii_pct"]), abs=1e-9)
    assert round(score.class_i, 4) == pytest.approx(float(row["class_i_pct"]), abs=1e-9)


def test_fixtures_match_mot_regression_floats_exactly() -> None:
    text = (ASSETS / "fixtures" / "mot_expected_results.json").read_text()
    models = json.loads(re.sub(r",(\s*[}\]])", r"\1", text))["models"]  # MOT's file has trailing ,
    expected = {m["release"]["name"]: m["classification"] for m in models}
    got = {}
    for path in ASSETS.glob("fixtures/*.yml"):
        doc = load_mot_yaml(path)
        got[doc.release.name] = score_release(doc)
    assert set(got) == set(expected)
    for name, cls in expected.items():
        score = got[name]
        assert score.mof_class == cls["class"], name
        assert score.label == cls["label"], name
        progress = (score.class_i, score.class_ii, score.class_iii)
        assert progress == tuple(float(cls["progress"][k]) for k in "123"), name


def test_packaged_license_data_equals_the_mot_extract() -> None:
    packaged = resources.files("openrelease.audit.mof_data")
    assert Path(str(packaged)).is_relative_to(Path(openrelease.__file__).parent)
    text = packaged.joinpath("licenses.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == yaml.safe_load((ASSETS / "licenses.yaml").read_text())
    assert "MIT License" in packaged.joinpath("LICENSE-MOT").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    union = {*raw["fsf_libre"], *raw["osi_approved"], *raw["open_data_hardcoded"]}
    assert license_lists().open == frozenset(union | set(raw["open_other_hardcoded"]))


def test_seventeen_components_in_three_classes() -> None:
    comps = mof_components()
    assert len(comps) == 17
    required = [sum(c.required and c.mof_class == k for c in comps) for k in (3, 2, 1)]
    assert required == [6, 4, 4]
    assert sum(not c.required for c in comps) == 3


@pytest.mark.parametrize(
    ("license_id", "is_open"),
    [
        ("Apache-2.0", True),
        ("ODC-PDDL-1.0", True),
        ("OpenMDW-1.0", True),
        ("GPL-3.0", True),
        ("PDDL-1.0", False),
        ("CC-PDDC", False),
        ("apache-2.0", False),
        ("Apache 2.0", False),
        ("MIT OR Apache-2.0", False),
        ("CC-BY-NC-4.0", False),
    ],
)
def test_open_license_matching_is_exact(license_id: str, is_open: bool) -> None:
    assert is_open_license(license_id) is is_open


def test_hub_spellings_normalize_to_spdx() -> None:
    assert normalize_license("apache-2.0") == "Apache-2.0"
    assert normalize_license("cc-by-4.0") == "CC-BY-4.0"
    assert normalize_license("llama2") == "llama2"


# ------------------------------------------------------------- edge cases (SCORING.md 7)

CLASS3 = ["Model architecture", "Model parameters (Final)", "Evaluation results", "Model card"]
CLASS3 += ["Data card", "Technical report"]
CLASS2 = ["Training code", "Inference code", "Evaluation code", "Evaluation data"]
CLASS1 = ["Datasets", "Data preprocessing code", "Model parameters (Intermediate)"]
CLASS1 += ["Research paper"]


def _doc(components: list[dict[str, object]], **licenses: object) -> MotDocument:
    data = {
        "framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
        "release": {"name": "t", "producer": "p", "license": licenses, "components": components},
    }
    return parse_mot_yaml(yaml.safe_dump(data), source="t.yml")


def _pct(doc: MotDocument) -> tuple[int, float, float, float]:
    s = score_release(doc)
    return s.mof_class, round(s.class_iii, 2), round(s.class_ii, 2), round(s.class_i, 2)


def test_unlicensed_blocks_inheritance() -> None:
    comps = [{"name": n} for n in CLASS3]
    dist = {"distribution": {"name": "Apache-2.0"}}
    assert _pct(_doc(comps, **dist)) == (3, 100.0, 60.0, 0.0)
    comps[0] = {"name": CLASS3[0], "license": "unlicensed"}
    assert _pct(_doc(comps, **dist))[:2] == (0, 83.33)
    comps[0] = {"name": CLASS3[0], "license": ""}
    assert _pct(_doc(comps, **dist))[:2] == (0, 83.33)


def test_null_typed_global_falls_back_to_distribution() -> None:
    comps = [{"name": n} for n in CLASS3]
    licenses = {"data": {"name": None}, "distribution": {"name": "MIT"}}
    assert _pct(_doc(comps, **licenses))[0] == 3


def test_paper_fills_the_report_slot_and_class_i_denominator() -> None:
    no_tr = [{"name": n, "license": "MIT"} for n in CLASS3[:5] + CLASS2 + CLASS1]
    assert _pct(_doc(no_tr)) == (1, 100.0, 100.0, 100.0)
    with_bad_tr = [*no_tr, {"name": "Technical report", "license": "Proprietary"}]
    assert _pct(_doc(with_bad_tr))[0] == 1
    without_rp = [c for c in no_tr if c["name"] != "Research paper"]
    without_rp.append({"name": "Technical report", "license": "MIT"})
    assert _pct(_doc(without_rp)) == (2, 100.0, 100.0, 92.86)
    first = [c for c in no_tr if c["name"] not in CLASS2[:1]]
    assert _pct(_doc(first)) == (3, 100.0, 90.0, 0.0)


def test_optional_and_type_warnings_never_change_the_score() -> None:
    comps = [{"name": n, "license": "CC-BY-4.0"} for n in CLASS3]
    base = _pct(_doc(comps))
    extra = [*comps, {"name": "Model metadata", "license": "Proprietary"}]
    assert _pct(_doc(extra)) == base == (3, 100.0, 60.0, 0.0)
    score = score_release(_doc(comps))
    arch = next(c for c in score.components if c.component == "Model architecture")
    assert arch.status == "included" and arch.type_appropriate is False


def test_score_licenses_accepts_ids_and_names() -> None:
    by_id = score_licenses({"model_card": "MIT", "Data card": "unlicensed"})
    statuses = {c.component: c.status for c in by_id.components}
    assert statuses["Model card"] == "included"
    assert statuses["Data card"] == "unlicensed"
    assert statuses["Training code"] == "missing"
    with pytest.raises(ParamsError, match="did you mean 'Model card'"):
        score_licenses({"Model Card": "MIT"})


# --------------------------------------------------------------------------- hostile input

GOOD = (ASSETS / "models" / "Amber.yml").read_text()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a: &a [1, 2]\nb: [*a, *a]\n", "aliases"),
        ("framework: [unclosed\n", "invalid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("x: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
        ("a: 1\na: 2\n", "duplicate key"),
        ("[" * 5000 + "]" * 5000, "nested too deeply|invalid YAML"),
        ("framework: {name: Other}\nrelease: {name: x, components: []}\n", "framework.name"),
        (GOOD.replace("name: 'Model card'", "name: 'Model Card'"), "did you mean 'Model card'"),
        (GOOD.replace("name: 'Model card'", "name: 'Weights'"), "unknown component 'Weights'"),
        (GOOD.replace("name: Amber", "name: true"), "release.name"),
        (GOOD.replace("      license: MIT", "      license: [MIT, GPL]"), "license"),
        (GOOD.replace("components:", "components: 7\n  x:"), "release.components"),
        ("framework: {name: Model Openness Framework}\nrelease: {}\n", "release.name"),
    ],
)
def test_hostile_yaml_gives_one_line_errors(text: str, match: str) -> None:
    with pytest.raises(ArtifactError, match=match) as info:
        parse_mot_yaml(text, source="evil.yml")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("evil.yml")


def test_too_many_components_and_huge_files_are_refused(tmp_path: Path) -> None:
    many = "\n".join("    - name: 'Model card'" for _ in range(18))
    text = GOOD.split("  components:")[0] + "  components:\n" + many + "\n"
    with pytest.raises(ArtifactError, match="at most 17"):
        parse_mot_yaml(text, source="many.yml")
    huge = tmp_path / "huge.yml"
    huge.write_text(GOOD + "#" * (1 << 20))
    with pytest.raises(ArtifactError, match="limit"):
        load_mot_yaml(huge)


def test_bad_files_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match="UTF-8"):
        load_mot_yaml(binary)
    link = tmp_path / "link.yml"
    os.symlink(ASSETS / "models" / "Amber.yml", link)
    with pytest.raises(ArtifactError, match="cannot be opened"):
        load_mot_yaml(link)
    with pytest.raises(ArtifactError, match="cannot be opened"):
        load_mot_yaml(tmp_path / "absent.yml")


# --------------------------------------------------------------------------- writing


def _our_release(**overrides: object) -> str:
    comps: dict[str, str | None] = {c.id: None for c in mof_components()}
    comps["model_parameters_final"] = "Apache-2.0"
    kwargs: dict[str, object] = {
        "name": "tiny-open-llm",
        "version": "1M",
        "producer": "openrelease",
        "components": comps,
        "licenses": {"distribution": "Apache-2.0", "data": "CDLA-Permissive-2.0"},
        "paths": {"model_card": "README.md", "Model parameters (Final)": "model"},
        "license_paths": {"Apache-2.0": "LICENSES/Apache-2.0.txt"},
        "release_fields": {"date": "2025-01-01", "treatment": "pre-trained"},
    }
    return mof_release_yaml(**(kwargs | overrides))  # type: ignore[arg-type]


def test_release_yaml_round_trips_and_scores_class_i() -> None:
    text = _our_release()
    assert text == _our_release()
    doc = parse_mot_yaml(text, source="mof.yaml")
    assert score_release(doc).mof_class == 1
    final = next(c for c in doc.release.components if c.name == "Model parameters (Final)")
    assert final.license == "Apache-2.0"
    assert final.license_path == "LICENSES/Apache-2.0.txt"
    assert final.component_path == "model"
    assert doc.release.date == "2025-01-01"
    undated = parse_mot_yaml(_our_release(release_fields=None), source="m").release
    assert undated.date is None and undated.architecture == "transformer decoder"


def test_release_yaml_rejects_bad_input() -> None:
    with pytest.raises(ParamsError, match="did you mean"):
        _our_release(components={"model card": "MIT"})
    with pytest.raises(ParamsError, match="release field 'weights'"):
        _our_release(release_fields={"weights": "x"})
    with pytest.raises(ParamsError, match="license kind"):
        _our_release(licenses={"weights": "MIT"})
    with pytest.raises(OpenReleaseError, match=r"release\.name"):
        _our_release(name="")


def test_component_code_paths_name_modules_that_exist() -> None:
    from openrelease.audit.mof import COMPONENTS

    root = Path(openrelease.__file__).parent.parent
    code = [path for kind, path in COMPONENTS.values() if path.startswith("code/")]
    assert code
    for path in code:
        assert (root / path.removeprefix("code/")).exists(), path
