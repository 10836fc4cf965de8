import sys
from pathlib import Path

# Test helpers live in tests/support and are imported as `support`.
sys.path.insert(0, str(Path(__file__).resolve().parent))
