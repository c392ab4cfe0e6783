from pathlib import Path

import pytest
from project_paths import REPO_ROOT

from openrelease.params import load_params

RECIPES = sorted((REPO_ROOT / "pipelines").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "gpu-1b.yaml", "moxin-7b-multinode.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(recipe: Path) -> None:
    params = load_params(recipe)
    assert params.pretrain.seq_len == params.data.seq_len


def test_init_offers_every_recipe() -> None:
    from openrelease.pipeline import recipe_names

    assert recipe_names() == sorted(p.stem for p in RECIPES)
    assert "tiny" in recipe_names()


def test_moxin_recipe_is_mistral_shaped_multinode() -> None:
    params = load_params(REPO_ROOT / "pipelines/moxin-7b-multinode.yaml")
    assert params.model.arch == "mistral" and params.model.num_layers == 36
    assert params.compute.nnodes > 1 and params.compute.rdzv_endpoint
