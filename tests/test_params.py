from pathlib import Path

import pytest
from project_paths import TEST_PARAMS

from openrelease.errors import ParamsError
from openrelease.params import PipelineParams, load_params


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _with(tmp_path: Path, old: str, new: str) -> Path:
    text = TEST_PARAMS.read_text(encoding="utf-8")
    assert old in text
    return _write(tmp_path, text.replace(old, new, 1))


def test_test_params_load_and_are_frozen() -> None:
    params = load_params(TEST_PARAMS)
    assert isinstance(params, PipelineParams)
    with pytest.raises(Exception, match="frozen"):
        params.seed = 3  # type: ignore[misc]


def test_every_field_has_a_docstring() -> None:
    from pydantic import BaseModel

    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    walk(arg)

    walk(PipelineParams)
    assert len(seen) > 8


def test_typo_names_the_yaml_path(tmp_path: Path) -> None:
    path = _with(tmp_path, "  lr: 3.0e-3", "  learning_rate: 3.0e-3")
    with pytest.raises(
        ParamsError, match=r"pretrain\.learning_rate: unknown key \(did you mean .lr.\?\)"
    ):
        load_params(path)


def test_bad_value_names_path_value_and_rule(tmp_path: Path) -> None:
    path = _with(tmp_path, "hidden_size: 32", "hidden_size: -4")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    msg = str(info.value)
    assert "model.hidden_size" in msg and "-4" in msg and "greater than or equal to 8" in msg


def test_wrong_type(tmp_path: Path) -> None:
    path = _with(tmp_path, "seed: 1234", "seed: twelve")
    with pytest.raises(ParamsError, match=r"seed: .*valid integer.*'twelve'"):
        load_params(path)


def test_cross_field_batch_vs_world_size(tmp_path: Path) -> None:
    path = _with(
        tmp_path,
        "global_batch_size: 8\n  micro_batch_size: 4",
        "global_batch_size: 4\n  micro_batch_size: 4",
    )
    with pytest.raises(
        ParamsError,
        match=r"global_batch_size 4 must be a multiple of micro_batch_size x world size = 4 x 2",
    ):
        load_params(path)


def test_missing_section(tmp_path: Path) -> None:
    text = TEST_PARAMS.read_text(encoding="utf-8").replace("seed: 1234\n", "")
    with pytest.raises(ParamsError, match="seed: required key is missing"):
        load_params(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("seed: 1\nseed: 2\n", "duplicate key 'seed'"),
        ("a: &x [1]\nb: *x\n", "aliases"),
        ("seed: [1\n", "invalid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("x: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ],
)
def test_hostile_yaml(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ParamsError, match=match):
        load_params(_write(tmp_path, text))


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"cp pipelines/tiny\.yaml params\.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: \xff\n")
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(path)


def test_fields_added_later_keep_the_params_digest_of_earlier_runs() -> None:
    """grpo.scale_rewards came after GRPO runs were recorded: at its default it is not in the
    stage's params digest (an earlier run still replays), set otherwise it is."""
    from openrelease.digest import sha256_json
    from openrelease.train import stage_params_digest

    params = load_params(TEST_PARAMS)
    grpo = params.stage("grpo")
    before = {k: v for k, v in grpo.model_dump(mode="json").items() if k != "scale_rewards"}
    assert grpo.digest_dump() == before
    recorded = sha256_json(
        {
            "seed": params.seed,
            "model": params.model.model_dump(mode="json"),
            "compute": params.compute.model_dump(mode="json"),
            "grpo": before,
        }
    )
    assert stage_params_digest(params, "grpo") == recorded
    unscaled = grpo.model_copy(update={"scale_rewards": "none"})
    assert unscaled.digest_dump()["scale_rewards"] == "none"
