"""Notebooks 00 (Network Dissection), 03 (CGL), 04 (UIBE) and 05 (NAD) executed through their real-data
branch on tests/paper_fixture.py's files (Broden, ImageFolder class folders, full-size checkpoints), with
tests/profiles/paper-fixture.toml: paper.toml's sections and `$VAR` paths at tiny budgets, so a user with
real data only sets paths.

Slow-ish (about two minutes on two CPU cores, most of it the full-size networks of 00 and 05): marked
`slow`, and part of `make test`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from replication.profiles import _unset_variables, load_profile
from replication.reproduce import notebook_paths, run_notebook
from tests.paper_fixture import PAPER_VARIABLES, write_paper_fixture

FIXTURE_PROFILE = Path(__file__).resolve().parent / "profiles" / "paper-fixture.toml"
CLAIMS = {"00": ["D1"], "03": [f"G{n}" for n in range(1, 9)], "04": ["P1", *(f"U{n}" for n in range(1, 6))],
          "05": [f"N{n}" for n in range(1, 8)]}


def _variables_read(profile: str | Path) -> dict[str, set[tuple[str, str]]]:
    """Per section, the (variable, key) pairs of every `$VAR` the profile reads (all of them unset)."""
    sections = load_profile(profile).sections
    return {name: set(_unset_variables(values, "")) for name, values in sections.items()}


def test_the_fixture_profile_has_paper_toml_sections_and_variables(monkeypatch):
    for variable in PAPER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert _variables_read(FIXTURE_PROFILE) == _variables_read("paper")


@pytest.fixture(scope="module")
def fixture_environment(tmp_path_factory):
    """Every file paper.toml points at (the full-size checkpoints are 670 MiB: removed afterwards)."""
    root = tmp_path_factory.mktemp("paper-files")
    yield write_paper_fixture(root)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("number", sorted(CLAIMS))
def test_the_notebook_runs_its_real_data_branch_on_the_fixture(number, fixture_environment, tmp_path, monkeypatch):
    for variable, value in fixture_environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("REPLICATION_DATA", str(tmp_path / "data"))  # the synthetic world and trained models
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path / "cache"))
    [notebook] = notebook_paths([number])
    run_notebook(notebook, str(FIXTURE_PROFILE), tmp_path / "results")
    out = tmp_path / "results" / notebook.stem
    claims = pd.read_csv(out / "claims.csv")
    assert claims["claim_id"].tolist() == CLAIMS[number]
    assert set(claims["profile"]) == {str(FIXTURE_PROFILE)}
    printed = "".join(output.get("text", "") for cell in nbformat.read(out / f"{notebook.stem}.ipynb", as_version=4).cells
                      for output in cell.get("outputs", []))
    assert "real data" in printed  # the branch the notebook took, in its own words
