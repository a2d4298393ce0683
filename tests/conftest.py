"""Shared fixtures. Tests that need ../shared/data skip with a reason where it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

from auditing import sources


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data root (../shared/data). Skips the test in a checkout without it."""
    root = sources.shared_data_dir()
    if root is None:
        pytest.skip("needs the real data in ../shared/data (or $LABEL_AUDIT_DATA); "
                    "CI has it, a plain user checkout does not")
    return root


@pytest.fixture(scope="session")
def real_raters_path(shared_data: Path) -> Path:
    return sources.fetch("real_raters", download=False)
