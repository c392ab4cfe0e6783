"""OpenSSF model-signing signatures: keygen, sign, verify (ours and model_signing's CLI)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_bundle, write_manifest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
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


def _model_signing_cli(bundle: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    """OpenSSF's own verifier, as a user runs it (offline: the key method needs no network)."""
    cli = Path(sys.executable).with_name("model_signing")
    args = ["verify", "key", str(bundle), "--signature", str(bundle / "signatures/model.sig")]
    return subprocess.run(
        [str(cli), *args, "--public_key", str(public_key)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_keygen_writes_a_private_key_only_the_owner_reads(key: Path) -> None:
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.with_name("release.pem.pub").read_text().startswith("-----BEGIN PUBLIC KEY")
    with pytest.raises(ParamsError, match="exists"):
        generate_key(key)


@pytest.mark.slow
def test_signature_is_openssf_model_signing_and_pins_the_key(
    bundle: Path, key: Path, tmp_path: Path
) -> None:
    manifest_before = (bundle / "MANIFEST.json").read_bytes()
    path, kid = sign_bundle(bundle, key)
    assert path == bundle / "signatures" / "model.sig" and kid.startswith("sha256:")
    # Signing stays out of MANIFEST.json: the bundle digest is unchanged.
    assert (bundle / "MANIFEST.json").read_bytes() == manifest_before
    pub = key.with_name("release.pem.pub")
    accepted = _model_signing_cli(bundle, pub)
    assert accepted.returncode == 0, accepted.stderr + accepted.stdout
    pinned = verify_bundle(bundle, trusted_keys=[pub])
    assert pinned.ok and pinned.signed_by == [kid], pinned.problems
    unpinned = verify_bundle(bundle)
    assert unpinned.ok and [p.code for p in unpinned.problems] == ["signature_unchecked"]

    other = tmp_path / "other.pem"
    generate_key(other)
    wrong = verify_bundle(bundle, trusted_keys=[other.with_name("other.pem.pub")])
    assert not wrong.ok and [p.code for p in wrong.problems] == ["signature", "unsigned"]
    # Another file beside model.sig changes nothing for model-signing's verifier, but ours
    # refuses it: nothing in signatures/ may ride along unchecked (it is outside MANIFEST.json).
    (bundle / "signatures" / "other.sig").write_text("{}")
    assert _model_signing_cli(bundle, pub).returncode == 0
    extra = verify_bundle(bundle, trusted_keys=[pub])
    assert [(p.code, p.path) for p in extra.problems] == [
        ("signature_folder", "signatures/other.sig")
    ]


@pytest.mark.slow
def test_file_changed_after_signing_fails_both_verifiers(bundle: Path, key: Path) -> None:
    sign_bundle(bundle, key)
    pub = key.with_name("release.pem.pub")
    (bundle / "docs" / "report.md").write_text("# Technical report, edited\n")
    write_manifest(bundle)  # even with a consistent manifest, the signature no longer holds
    assert _model_signing_cli(bundle, pub).returncode != 0
    report = verify_bundle(bundle, trusted_keys=[pub])
    assert not report.ok
    assert {p.code for p in report.problems} == {"signature", "unsigned"}
    (bundle / "signatures" / "model.sig").write_text("{not json")
    (check,) = check_signatures(bundle, trusted_keys=[pub])
    assert not check.valid and "no --trusted-key verifies it" in (check.problem or "")


def test_earlier_ed25519_signatures_are_still_checked(bundle: Path, tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pem"
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    legacy.write_bytes(pem)
    path, kid = sign_bundle(bundle, legacy)
    assert path.name.endswith(".sig.json")
    (check,) = check_signatures(bundle)
    assert check.valid and check.key_id == kid
    manifest = bundle / "MANIFEST.json"
    manifest.write_text(manifest.read_text().replace('"name"', '"name" ', 1))
    (check,) = check_signatures(bundle)
    assert not check.valid and "changed after signing" in (check.problem or "")


def test_unsigned_bundle_with_trusted_key_fails(bundle: Path, key: Path) -> None:
    report = verify_bundle(bundle, trusted_keys=[key.with_name("release.pem.pub")])
    assert not report.ok and report.problems[-1].code == "unsigned"


def test_cli_keygen_sign_verify(bundle: Path, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert runner.invoke(app, ["keygen", str(key)]).exit_code == 0
    signed = runner.invoke(app, ["sign", str(bundle), "--key", str(key), "--json"])
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.stdout)["signature"].endswith("signatures/model.sig")
    ok = runner.invoke(app, ["verify", str(bundle), "--trusted-key", f"{key}.pub"])
    assert ok.exit_code == 0 and "signed by sha256:" in ok.stdout
    not_a_key = runner.invoke(app, ["sign", str(bundle), "--key", str(bundle / "README.md")])
    assert not_a_key.exit_code == 1 and "openrelease keygen" in not_a_key.stderr


def test_cli_refuses_to_sign_a_bundle_that_does_not_verify(bundle: Path, key: Path) -> None:
    (bundle / "README.md").write_text("changed")
    result = runner.invoke(app, ["sign", str(bundle), "--key", str(key)])
    assert result.exit_code == 1 and "not signed" in result.stderr
    assert not (bundle / "signatures").exists()
