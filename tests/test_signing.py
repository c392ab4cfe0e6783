"""Ed25519 signatures over MANIFEST.json: keygen, sign, verify with and without pinned keys."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from bundle_factory import make_bundle
from typer.testing import CliRunner

from openrelease.cli import app
from openrelease.errors import ParamsError
from openrelease.verify.bundle import verify_bundle
from openrelease.verify.signing import check_signatures, generate_key, sign_bundle

runner = CliRunner()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path, num_checkpoints=1)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "release.pem"
    generate_key(path)
    return path


def test_keygen_writes_a_private_key_only_the_owner_reads(key: Path) -> None:
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.with_name("release.pem.pub").read_text().startswith("-----BEGIN PUBLIC KEY")
    with pytest.raises(ParamsError, match="exists"):
        generate_key(key)


def test_signed_bundle_verifies_and_pins_the_key(bundle: Path, key: Path, tmp_path: Path) -> None:
    digest_before = json.loads((bundle / "MANIFEST.json").read_text())["bundle_digest"]
    path, sig = sign_bundle(bundle, key)
    assert path.parent.name == "signatures" and sig.key_id.startswith("sha256:")
    report = verify_bundle(bundle)
    assert report.ok and report.signed_by == [sig.key_id]
    assert [p.code for p in report.problems] == ["signature_unpinned"]  # a warning
    pinned = verify_bundle(bundle, trusted_keys=[key.with_name("release.pem.pub")])
    assert pinned.ok and not pinned.problems
    # Signing does not change the manifest, so the bundle digest is the same.
    assert json.loads((bundle / "MANIFEST.json").read_text())["bundle_digest"] == digest_before

    other = tmp_path / "other.pem"
    generate_key(other)
    wrong = verify_bundle(bundle, trusted_keys=[other.with_name("other.pem.pub")])
    assert not wrong.ok and [p.code for p in wrong.problems] == ["unsigned"]


def test_manifest_changed_after_signing_is_named(bundle: Path, key: Path) -> None:
    sign_bundle(bundle, key)
    manifest = bundle / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"name"', '"name" ', 1))
    (check,) = check_signatures(bundle)
    assert not check.valid and "changed after signing" in (check.problem or "")
    assert not verify_bundle(bundle).ok


def test_forged_signature_files_are_rejected(bundle: Path, key: Path) -> None:
    path, sig = sign_bundle(bundle, key)
    other = Path(str(key) + ".2")
    generate_key(other)
    _, theirs = sign_bundle(bundle, other)
    # Claim our key id with their public key: the key id must match the key.
    forged = sig.model_copy(update={"public_key": theirs.public_key}).model_dump_json()
    path.write_text(forged)
    problems = {c.problem for c in check_signatures(bundle) if not c.valid}
    assert problems == {"key_id does not match public_key"}
    path.write_text("{not json")
    assert any("not a signature file" in (c.problem or "") for c in check_signatures(bundle))


def test_unsigned_bundle_with_trusted_key_fails(bundle: Path, key: Path) -> None:
    report = verify_bundle(bundle, trusted_keys=[key.with_name("release.pem.pub")])
    assert not report.ok and report.problems[-1].code == "unsigned"


def test_cli_keygen_sign_verify(bundle: Path, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert runner.invoke(app, ["keygen", str(key)]).exit_code == 0
    signed = runner.invoke(app, ["sign", str(bundle), "--key", str(key), "--json"])
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.stdout)["algorithm"] == "ed25519"
    ok = runner.invoke(app, ["verify", str(bundle), "--trusted-key", f"{key}.pub"])
    assert ok.exit_code == 0 and "signed by sha256:" in ok.stdout
    not_a_key = runner.invoke(app, ["sign", str(bundle), "--key", str(bundle / "README.md")])
    assert not_a_key.exit_code == 1 and "openrelease keygen" in not_a_key.stderr


def test_cli_refuses_to_sign_a_bundle_that_does_not_verify(bundle: Path, key: Path) -> None:
    (bundle / "README.md").write_text("changed")
    result = runner.invoke(app, ["sign", str(bundle), "--key", str(key)])
    assert result.exit_code == 1 and "not signed" in result.stderr
    assert not (bundle / "signatures").exists()
