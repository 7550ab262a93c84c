"""The valid artifacts the fuzz tests start from, written once per session by the real writers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fuzz.artifacts import TARGETS


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Many tiny reads: one intra-op thread avoids oversubscribing a shared 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
