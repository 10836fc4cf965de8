"""An outsider's attempts on a job's server, run inside a Pod of the test cluster that holds the
job's CA certificate and reaches the server's port (`python - < outsider.py` in that Pod, with
SERVER=host:port, CA=file, APP=folder of a Flower app that is not the job's, SITE=a real site's
name). Uses only stock Flower, as an outsider would. Prints one JSON object: what each attempt
got back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

SERVER, CA, APP, SITE = os.environ["SERVER"], os.environ["CA"], os.environ["APP"], os.environ["SITE"]
home = Path(tempfile.mkdtemp(prefix="outsider-"))
(home / "config.toml").write_text(f'[superlink]\ndefault = "x"\n\n[superlink.x]\naddress = "{SERVER}"\nroot-certificates = "{CA}"\n')
env = {**os.environ, "FLWR_HOME": str(home)}


def flwr(*args: str) -> dict:
    done = subprocess.run(["flwr", *args, "--format", "json"], capture_output=True, text=True, env=env, timeout=120)
    try:
        reply = json.loads(done.stdout)
    except json.JSONDecodeError:
        reply = {"stdout": done.stdout[-2000:]}
    return {"code": done.returncode, "reply": reply, "stderr": done.stderr[-2000:]}


def supernode(key: Path | None) -> dict:
    data = home / "data.csv"
    data.write_text("a,b\n1,2\n")
    command = ["flower-supernode", "--superlink", SERVER, "--root-certificates", CA]
    command += ["--node-config", f'site="{SITE}" data-path="{data}"', "--port", "9195"]
    if key:
        command += ["--auth-supernode-private-key", str(key)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=90)
        return {"code": done.returncode, "output": (done.stdout + done.stderr)[-4000:]}
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        return {"code": None, "output": output[-4000:]}


app = home / "app"
shutil.copytree(APP, app)
private = ec.generate_private_key(ec.SECP384R1())
key, public = home / "own.key", home / "own.pub"
key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
key.chmod(0o600)
public.write_bytes(private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))

attempts = {
    "no-key": lambda: supernode(None),
    "own-key": lambda: supernode(key),
    "list": lambda: flwr("ls", "x"),
    "submit": lambda: flwr("run", str(app), "x", "--run-config", 'marker-dir="/tmp"'),
    "register": lambda: flwr("supernode", "register", str(public), "x"),
}
results = {}
for name, attempt in attempts.items():
    started = time.monotonic()
    results[name] = {**attempt(), "seconds": round(time.monotonic() - started, 1)}
print(json.dumps(results))
