"""Where things live: repo root, generated data, caches and results (overridable by environment)."""
from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The repository root: the folder holding `pyproject.toml` above this package.

    Notebooks run with their own folder as working directory (nbval, papermill), so every path is
    resolved from here rather than from the current directory.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here.parent, *here.parents):
        if (candidate / "pyproject.toml").exists():
            return candidate
    return Path.cwd()


def data_dir() -> Path:
    """Generated datasets (ConceptWorld); `REPLICATION_DATA` overrides."""
    return Path(os.environ.get("REPLICATION_DATA", repo_root() / "data"))


def cache_dir() -> Path:
    """Trained models and other cached stage outputs; `REPLICATION_CACHE` overrides."""
    return Path(os.environ.get("REPLICATION_CACHE", data_dir() / "cache"))


def results_dir() -> Path:
    """Executed notebooks, tables and figures; `REPLICATION_RESULTS` overrides."""
    return Path(os.environ.get("REPLICATION_RESULTS", repo_root() / "results"))
