import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Test helpers live in tests/support and are imported as `support`.
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Processes the tests start (bouquet, and the Flower processes it starts) import this
# checkout's code, whatever their working directory: make every entry absolute.
_paths = [str(ROOT / "operator"), str(ROOT / "workloads")]
_paths += [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(_paths))
