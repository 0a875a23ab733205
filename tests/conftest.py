import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _golden_dir():
    candidates = [os.environ.get("DIFFPROB_GOLDEN", ""), REPO.parent / "shared" / "golden", REPO / "shared" / "golden"]
    for c in candidates:
        if c and Path(c, "recordio").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def golden_dir():
    """The third-party reference files (../shared/golden). CI must have them; elsewhere they are optional."""
    d = _golden_dir()
    if d is None:
        if os.environ.get("CI"):
            pytest.fail("shared/golden not found beside the checkout; CI must test against the golden files")
        pytest.skip("shared/golden not found (set DIFFPROB_GOLDEN)")
    return d
