"""A per-job certificate authority and the server certificate it signs.

Sites verify the server against the job's CA, so a site holding another CA cannot talk to
the server, and nobody between them can read the weights and metrics they exchange.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Bundle:
    """PEM bytes, in cert-manager's Secret layout (ca.crt, tls.crt, tls.key)."""

    ca_crt: bytes
    tls_crt: bytes
    tls_key: bytes

    def files(self) -> dict[str, bytes]:
        return {"ca.crt": self.ca_crt, "tls.crt": self.tls_crt, "tls.key": self.tls_key}

    def write(self, directory: Path) -> dict[str, Path]:
        """Writes the three files (the key readable by the owner only); returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, data in self.files().items():
            path = directory / name
            path.write_bytes(data)
            path.chmod(0o600 if name.endswith(".key") else 0o644)
            paths[name] = path
        return paths


def placeholder() -> Bundle:
    """What `bouquet render` shows in place of a job's TLS material: the operator makes the
    CA and the server's key in the cluster, and no command prints a private key."""
    text = b"placeholder: the operator makes this in the cluster"
    return Bundle(text, text, text)


def issue(job_name: str, hostnames: list[str]) -> Bundle:
    """A fresh CA for the job and a server certificate for hostnames (DNS names or IPs)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bouquet {job_name} CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**_usage(cert_sign=True)), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [_san(h) for h in hostnames]
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]), ca_name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**_usage(digital_signature=True)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Bundle(
        ca_cert.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: datetime.datetime) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _usage(cert_sign: bool = False, digital_signature: bool = False) -> dict[str, bool]:
    flags = dict.fromkeys(
        ["content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "crl_sign", "encipher_only", "decipher_only"],
        False,
    )
    return {**flags, "digital_signature": digital_signature, "key_cert_sign": cert_sign, "crl_sign": cert_sign}


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
