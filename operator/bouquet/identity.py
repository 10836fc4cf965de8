"""Each site's own key, which proves the site to the server.

A site holds an EC private key (NIST P-384, OpenSSH format, as Flower's SuperNode
authentication wants) that never leaves it; the server holds the sites' public keys and
admits only SuperNodes that sign with one of them. A site's name follows from its key: the
server registers each public key under its site's name before any site connects, so what a
SuperNode says about itself does not count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PRIVATE = "site.key"
PUBLIC = "site.pub"


@dataclass(frozen=True)
class SiteKey:
    private: bytes  # OpenSSH private key
    public: bytes  # one OpenSSH public key line

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Writes site.key (readable by the owner only) and site.pub into directory."""
        directory.mkdir(parents=True, exist_ok=True)
        private, public = directory / PRIVATE, directory / PUBLIC
        private.touch(mode=0o600)
        private.chmod(0o600)
        private.write_bytes(self.private)
        public.write_bytes(self.public)
        return private, public


def make() -> SiteKey:
    key = ec.generate_private_key(ec.SECP384R1())
    return SiteKey(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
    )


def fingerprint(public: bytes) -> str:
    """The sha256 of a public key line, as the server's nodes.json records it (keySha256)."""
    return hashlib.sha256(public.strip()).hexdigest()


def public_of(private: bytes) -> bytes:
    """The public key line of an OpenSSH private key."""
    key = serialization.load_ssh_private_key(private, password=None)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"


def placeholder() -> SiteKey:
    """What `bouquet render` shows in place of a site's key: the operator makes it in the cluster."""
    text = b"placeholder: the operator makes this in the cluster"
    return SiteKey(text, text)


def public_key_problem(text: str) -> str:
    """Why text is not a site's public key ("" if it is): one OpenSSH line of an EC key on a
    NIST curve, as `ssh-keygen -t ecdsa` or Bouquet itself writes it."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        return f"not an OpenSSH public key ({error})"
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in {"secp256r1", "secp384r1", "secp521r1"}:
        return "not an EC key on a NIST curve (P-256, P-384 or P-521)"
    return ""
