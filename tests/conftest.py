import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden_dir():
    """Third-party reference files kept in the repository: RecordIO written by MXNet 1.9.1 (see golden/README.md)."""
    assert (GOLDEN / "recordio").is_dir(), f"{GOLDEN}/recordio is missing from this checkout"
    return GOLDEN
