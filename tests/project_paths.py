"""Where the repository and the test assets are (importable from any test folder)."""

from pathlib import Path

TESTS = Path(__file__).parent
ASSETS = TESTS / "assets"
REPO_ROOT = TESTS.parent
TEST_PARAMS = ASSETS / "params_test.yaml"
