import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Test helpers live in tests/support and are imported as `support`.
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Processes the tests start (bouquet, and the Flower processes it starts) import this
# checkout's code, whatever their working directory: make every entry absolute.
_paths = [str(ROOT / "operator"), str(ROOT / "workloads")]
_paths += [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(_paths))


@pytest.fixture(scope="session")
def helm() -> str:
    """A helm built from its upstream Go module (scripts/helm.sh), cached."""
    built = subprocess.run(["bash", str(ROOT / "scripts" / "helm.sh")], capture_output=True, text=True)
    if built.returncode:
        pytest.fail(f"helm could not be built (scripts/helm.sh):\n{built.stderr[-3000:]}", pytrace=False)
    return built.stdout.strip()


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory):
    """A user's shell at the root of a fresh copy of the checkout, after the README's quick
    start, `make run`: once for the whole session. The README's tests go on from it, and the
    cluster's first job is compared with the model it wrote (both on this machine: weights are
    the same to the bit only on processors that add the same way, see the quick start)."""
    from support import readme

    clone = readme.fresh_clone(tmp_path_factory.mktemp("readme") / "bouquet")
    user = readme.Session(clone, readme.user_environment())
    user.quick_start = user.run(readme.commands("quick-start")[0], timeout=1200)
    return user
