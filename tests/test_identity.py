"""A site's key: what Bouquet makes is what Flower's SuperNode authentication takes, and the
server refuses anything else as a site's public key before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from bouquet import cli, identity

ROOT = Path(__file__).resolve().parent.parent


def test_a_made_key_is_a_p384_openssh_pair_whose_private_half_only_its_owner_reads(tmp_path):
    private, public = identity.make().write(tmp_path / "a")
    assert identity.public_key_problem(public.read_text()) == ""
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) == public.read_bytes().strip()


def ssh_public(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "not an OpenSSH public key"),
        ("hello", "not an OpenSSH public key"),
        (ssh_public(rsa.generate_private_key(public_exponent=65537, key_size=2048)), "not an EC key on a NIST curve"),
        (ssh_public(ed25519.Ed25519PrivateKey.generate()), "not an EC key on a NIST curve"),
    ],
)
def test_anything_but_an_ec_public_key_is_refused(text, problem):
    assert identity.public_key_problem(text).startswith(problem)


def test_the_server_refuses_a_bad_site_key_naming_the_file_before_it_starts(tmp_path, capsys):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "hospital-a.pub").write_text("not a key\n")
    tls_dir = tmp_path / "tls"
    args = ["server", str(ROOT / "examples" / "breast-cancer.yaml"), "--out", str(tmp_path / "out"), "--tls-dir", str(tls_dir)]
    with pytest.raises(SystemExit) as stopped:
        cli.main([*args, "--site-keys", str(keys)])
    assert stopped.value.code == 2
    assert f"--site-keys: {keys / 'hospital-a.pub'} is not an OpenSSH public key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
