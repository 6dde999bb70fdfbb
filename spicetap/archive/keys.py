"""The Ed25519 key that signs finished archives, kept in spicetap's config directory."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_NAME = "archive-signing.key"
PUB_NAME = "archive-signing.pub"


def config_dir() -> Path:
    env = os.environ.get("SPICETAP_CONFIG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spicetap"


def load_or_create_signing_key(directory: Path | None = None) -> Ed25519PrivateKey:
    """The signing key, created (mode 0600) with its public half on first use."""
    folder = directory or config_dir()
    key_path = folder / KEY_NAME
    if key_path.is_file():
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:  # TypeError: the key wants a passphrase
            why = "protected by a passphrase" if isinstance(exc, TypeError) else "not a PEM key"
            raise ValueError(f"{key_path}: {why} (damaged? move it away)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{key_path}: not an Ed25519 private key")
        return key
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    (folder / PUB_NAME).write_bytes(public_pem(key.public_key()))
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def trusted_public_key(directory: Path | None = None) -> Ed25519PublicKey | None:
    path = (directory or config_dir()) / PUB_NAME
    if not path.is_file():
        return None
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not a PEM public key (damaged? move it away)") from None
    return key if isinstance(key, Ed25519PublicKey) else None
