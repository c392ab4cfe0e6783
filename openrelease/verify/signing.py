"""Release signatures: OpenSSF model-signing (key method) over the bundle, checked offline.

`openrelease sign` writes ``signatures/model.sig``: a model-signing (OpenSSF Model Signing,
sigstore bundle format) signature made with an EC P-256 key, over every file of the bundle
but ``signatures/`` itself, so signing never changes MANIFEST.json or the bundle digest and
other parties can co-sign beside it. ``model_signing verify key release --signature
release/signatures/model.sig --public_key KEY.pub`` accepts it, and so does
``openrelease verify --trusted-key KEY.pub``. Signatures of the earlier openrelease format
(``signatures/<key id>.sig.json``: Ed25519 over MANIFEST.json's bytes) are still checked.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import model_signing.hashing
import model_signing.signing
import model_signing.verifying
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from openrelease.digest import sha256_bytes
from openrelease.errors import ArtifactError, ParamsError
from openrelease.layout import BUNDLE_MANIFEST, BundleManifestName, BundleSection
from openrelease.manifest import write_bytes_atomic, write_json
from openrelease.verify.untrusted import read_capped

if TYPE_CHECKING:
    import model_signing.hashing

SUFFIX = ".sig.json"
MODEL_SIG = "model.sig"
"""The model-signing signature `sign_bundle` writes in ``signatures/``."""
_SIGNATURE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}\.sig\.json")


def is_signature_name(name: str) -> bool:
    """Whether ``name`` (in ``signatures/``) is a signature file: model.sig or <key id>.sig.json."""
    return name == MODEL_SIG or _SIGNATURE_NAME.fullmatch(name) is not None


MAX_SIGNATURE_BYTES = 64 << 10
MAX_KEY_BYTES = 16 << 10
MAX_MANIFEST_BYTES = 64 << 20
_KEY_ID = re.compile(r"sha256:[0-9a-f]{64}")


class Signature(BaseModel):
    """``signatures/<key id>.sig.json``: one Ed25519 signature over MANIFEST.json's bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: Literal[1] = 1
    algorithm: Literal["ed25519"] = "ed25519"
    signed_file: BundleManifestName = BUNDLE_MANIFEST
    manifest_sha256: str
    public_key: str
    """The raw 32-byte public key, base64."""
    key_id: str
    """sha256 of the raw public key; pin it with ``verify --trusted-key``."""
    signature: str
    """The raw 64-byte signature, base64."""


@dataclass(frozen=True)
class SignatureCheck:
    """What one signature file showed."""

    path: str
    key_id: str | None
    valid: bool
    trusted: bool
    problem: str | None


def key_id(public: Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    """``sha256:<hex>`` of the raw (Ed25519) or DER SubjectPublicKeyInfo (EC) public key."""
    if isinstance(public, Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return sha256_bytes(raw)


def generate_key(private_path: Path) -> tuple[Path, str]:
    """Write a new EC P-256 private key (PEM, mode 600) and its public key beside it (``.pub``).

    P-256 is what model-signing's key method takes (it has no Ed25519).

    Returns:
        The public key path and the key id.

    Raises:
        ParamsError: ``private_path`` exists (keys are never overwritten).
    """
    pub_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, pub_path):
        if path.exists() or path.is_symlink():
            raise ParamsError(f"{path} exists; choose another path (keys are not overwritten).")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key()
    pub_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _create_atomic(pub_path, pub_pem)
    return pub_path, key_id(public)


def _create_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file, then hard-link it to ``path`` (all or nothing).

    Unlike a rename, the link never replaces a ``path`` that appeared meanwhile.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_bytes_atomic(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ParamsError(
            f"{path} exists; choose another path (keys are not overwritten)."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _load_private(path: Path) -> Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(
            read_capped(path, max_bytes=MAX_KEY_BYTES), password=None
        )
    except (ValueError, TypeError) as exc:
        raise ParamsError(
            f"{path} is not an unencrypted PEM private key ({exc}); make one with "
            "`openrelease keygen`."
        ) from None
    if not isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ParamsError(
            f"{path} is not an EC or Ed25519 key; make one with `openrelease keygen`."
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey | ec.EllipticCurvePublicKey:
    """Read a PEM EC or Ed25519 public key (the ``.pub`` file `generate_key` writes).

    Raises:
        ParamsError: The file is not one.
    """
    try:
        key = serialization.load_pem_public_key(read_capped(path, max_bytes=MAX_KEY_BYTES))
    except ValueError as exc:
        raise ParamsError(f"{path} is not a PEM public key ({exc}).") from None
    if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ParamsError(f"{path} is not an EC or Ed25519 public key.")
    return key


def _hashing(bundle_dir: Path) -> model_signing.hashing.Config:
    # signatures/ is left out (and recorded as ignored in the signature): co-signers add theirs.
    import model_signing.hashing

    return model_signing.hashing.Config().set_ignored_paths(  # type: ignore[no-untyped-call]
        paths=[Path(BundleSection.SIGNATURES)], ignore_git_paths=True
    )


def sign_bundle(bundle_dir: Path, private_key: Path) -> tuple[Path, str]:
    """Sign the bundle with model-signing's key method; writes ``signatures/model.sig``.

    Sign after `openrelease verify` passed. An Ed25519 key (made by earlier openrelease
    versions) writes the earlier ``signatures/<key id>.sig.json`` instead.

    Returns:
        The signature's path and the signing key's id.

    Raises:
        ArtifactError: The bundle has no readable MANIFEST.json.
        ParamsError: The key is not an unencrypted EC (P-256/384/521) or Ed25519 PEM key.
    """
    key = _load_private(private_key)
    if isinstance(key, Ed25519PrivateKey):
        path, sig = _sign_ed25519(bundle_dir, key)
        return path, sig.key_id
    read_capped(bundle_dir / BUNDLE_MANIFEST, max_bytes=MAX_MANIFEST_BYTES)  # is a bundle
    import model_signing.signing  # ~1 s to import (sigstore); only signing needs it

    folder = bundle_dir / BundleSection.SIGNATURES
    folder.mkdir(exist_ok=True)
    path = folder / MODEL_SIG
    tmp = folder / f".{MODEL_SIG}.tmp-{os.getpid()}"
    try:
        model_signing.signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            private_key=private_key
        ).set_hashing_config(_hashing(bundle_dir)).sign(bundle_dir, tmp)
        os.replace(tmp, path)
    except ValueError as exc:
        raise ParamsError(f"{private_key} cannot sign: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path, key_id(key.public_key())


def _sign_ed25519(bundle_dir: Path, key: Ed25519PrivateKey) -> tuple[Path, Signature]:
    manifest = read_capped(bundle_dir / BUNDLE_MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    public = key.public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = Signature(
        manifest_sha256=sha256_bytes(manifest),
        public_key=base64.b64encode(raw).decode(),
        key_id=key_id(public),
        signature=base64.b64encode(key.sign(manifest)).decode(),
    )
    path = (
        bundle_dir / BundleSection.SIGNATURES / f"{sig.key_id.removeprefix('sha256:')[:16]}{SUFFIX}"
    )
    write_json(path, sig)
    return path, sig


def _check_model_sig(bundle_dir: Path, path: Path, trusted: dict[str, Path]) -> SignatureCheck:
    """A model-signing signature: valid when one trusted EC key verifies it over the files."""
    rel = f"{BundleSection.SIGNATURES}/{path.name}"
    if not trusted:
        # The key method's signature does not carry its key: nothing to check it with.
        return SignatureCheck(rel, None, True, False, None)
    import model_signing.verifying  # ~1 s to import (sigstore); only model.sig needs it

    problems = []
    for kid, pub in trusted.items():
        try:
            config = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
            config.use_elliptic_key_verifier(public_key=pub).verify(bundle_dir, path)
        except Exception as exc:  # model-signing raises ValueError, protobuf and JSON errors
            problems.append(" ".join(str(exc).split())[:200] or type(exc).__name__)
            continue
        return SignatureCheck(rel, kid, True, True, None)
    return SignatureCheck(rel, None, False, False, f"no --trusted-key verifies it ({problems[0]})")


def _check_one(path: Path, manifest: bytes, trusted: set[str]) -> SignatureCheck:
    rel = f"{BundleSection.SIGNATURES}/{path.name}"
    try:
        sig = Signature.model_validate_json(read_capped(path, max_bytes=MAX_SIGNATURE_BYTES))
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(sig.public_key, validate=True))
        raw_sig = base64.b64decode(sig.signature, validate=True)
    except (ArtifactError, ValidationError, ValueError) as exc:
        why = str(exc).splitlines()[0][:200]
        return SignatureCheck(rel, None, False, False, f"is not a signature file ({why})")
    kid = key_id(public)
    if kid != sig.key_id or not _KEY_ID.fullmatch(kid):
        return SignatureCheck(rel, sig.key_id, False, False, "key_id does not match public_key")
    try:
        public.verify(raw_sig, manifest)
    except InvalidSignature:
        return SignatureCheck(
            rel, kid, False, False, "does not match MANIFEST.json (changed after signing)"
        )
    return SignatureCheck(rel, kid, True, kid in trusted, None)


def check_signatures(
    bundle_dir: Path, *, trusted_keys: list[Path] | None = None
) -> list[SignatureCheck]:
    """Check every ``signatures/*.sig.json`` against MANIFEST.json's bytes.

    Args:
        bundle_dir: The release folder.
        trusted_keys: Public keys to trust; a valid signature by another key is not trusted.

    Returns:
        One check per signature file (empty when the bundle is unsigned).

    Raises:
        ArtifactError: MANIFEST.json cannot be read.
        ParamsError: A trusted key file is not an Ed25519 public key.
    """
    keys = {p: load_public_key(p) for p in trusted_keys or []}
    trusted = {key_id(k) for k in keys.values()}
    ec_keys = {key_id(k): p for p, k in keys.items() if isinstance(k, ec.EllipticCurvePublicKey)}
    folder = bundle_dir / BundleSection.SIGNATURES
    if not folder.is_dir() or folder.is_symlink():
        return []
    manifest = read_capped(bundle_dir / BUNDLE_MANIFEST, max_bytes=MAX_MANIFEST_BYTES)
    checks = []
    for path in sorted(folder.iterdir()):
        if path.name.endswith(SUFFIX):
            checks.append(_check_one(path, manifest, trusted))
        elif path.name == MODEL_SIG and path.is_file() and not path.is_symlink():
            checks.append(_check_model_sig(bundle_dir, path, ec_keys))
    return checks
