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


def results_dir(profile: str | None = None) -> Path:
    """Executed notebooks, tables and figures; `REPLICATION_RESULTS` overrides.

    The `default` profile's results are the committed `results/`; any other profile writes to
    `results-<profile>/`, so a ci or gpu run never overwrites (or mixes into) the default results.
    """
    if "REPLICATION_RESULTS" in os.environ:
        return Path(os.environ["REPLICATION_RESULTS"])
    if profile is None or Path(profile).stem == "default":
        return repo_root() / "results"
    return repo_root() / f"results-{Path(profile).stem}"
