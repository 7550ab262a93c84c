"""The valid artifacts the fuzz tests start from, written once per session by the real writers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import one_thread
from tests.fuzz.artifacts import TARGETS


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Many tiny reads: one intra-op thread avoids oversubscribing a shared 2-core CPU."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def seeds(tmp_path_factory):
    """seeds(name) -> the directory of target `name`'s valid artifact (built on first use). Tests copy it."""
    root = tmp_path_factory.mktemp("fuzz-seeds")
    built: dict[str, Path] = {}

    def seed(name: str) -> Path:
        if name not in built:
            d = root / name
            d.mkdir()
            TARGETS[name].build(d)
            built[name] = d
        return built[name]

    return seed
