"""Fixtures of the evaluate tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every evaluate test runs torch on one thread (``one_thread``, tests/conftest.py)."""
