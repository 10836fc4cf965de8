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
