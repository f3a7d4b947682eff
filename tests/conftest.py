"""Test session set-up: a non-interactive matplotlib backend, quiet progress bars, the `slow` marker,
a tiny world, placeholders for the paper profile's variables."""
import os
from pathlib import Path

import pytest

from replication.data import concept_world as cw
from tests.paper_fixture import PAPER_VARIABLES

os.environ.setdefault("MPLBACKEND", "agg")
os.environ.setdefault("REPLICATION_QUIET", "1")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: executes notebooks on fixture files (minutes on two cores); part of `make test`")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A 12-image ConceptWorld (read-only by convention: tests copy it before damaging it)."""
    return cw.generate_world(cw.WorldConfig(n_images=12, image_size=32, seed=3),
                             tmp_path_factory.mktemp("world") / "w", workers=1)


@pytest.fixture()
def paper_placeholders(monkeypatch) -> None:
    """Every variable paper.toml reads set to a placeholder path, so its sections can be read without real data."""
    for variable in PAPER_VARIABLES:
        monkeypatch.setenv(variable, f"/placeholder/{variable}")
