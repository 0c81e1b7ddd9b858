"""Shared fixtures."""

from __future__ import annotations

import pytest

from cetopt.solving import registry


@pytest.fixture
def clean_registry():
    """Snapshot the solver registry and restore it afterwards, so tests may register freely."""
    registry._load_entry_points()
    saved = dict(registry._entries)
    yield registry
    registry._entries.clear()
    registry._entries.update(saved)
