"""The notebook runner: order, parameters, failure reporting, summary."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from replication import reproduce


def _notebook(path: Path, body: str) -> Path:
    notebook = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "ci"')
    params.metadata["tags"] = ["parameters"]
    notebook.cells = [params, nbformat.v4.new_code_cell(body)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)
    return path


@pytest.fixture()
def notebooks(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    monkeypatch.setattr(reproduce.paths, "repo_root", lambda: tmp_path)
    return folder


def test_runs_in_number_order_injects_profile_and_summarises(notebooks: Path, tmp_path: Path):
    claims = (
        "import pandas as pd, pathlib\n"
        "out = pathlib.Path(r'{results}') / '01_b'; out.mkdir(parents=True, exist_ok=True)\n"
        "pd.DataFrame([dict(paper_id='01', claim_id='X1', claim='c', paper='p', ours=profile, verdict='confirmed', seeds='0')])"
        ".to_csv(out / 'claims.csv', index=False)"
    ).format(results=tmp_path / "results")
    _notebook(notebooks / "01_b.ipynb", claims)
    _notebook(notebooks / "00_a.ipynb", "print(profile)")
    runs = reproduce.reproduce(profile="default", results_root=tmp_path / "results")
    assert [r.name for r in runs] == ["00_a", "01_b"]
    executed = nbformat.read(tmp_path / "results" / "00_a" / "00_a.ipynb", as_version=4)
    assert any("default" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    summary = (tmp_path / "results" / "README.md").read_text()
    assert "| 01 | X1 | c | p | default | confirmed | 0 |" in summary
    assert "| [00_a](00_a/00_a.ipynb) | default |" in summary


def test_failure_names_notebook_and_cell_and_stops(notebooks: Path, tmp_path: Path):
    _notebook(notebooks / "00_bad.ipynb", "raise ValueError('boom')")
    _notebook(notebooks / "01_never.ipynb", "print(1)")
    with pytest.raises(reproduce.NotebookFailed, match=r"00_bad\.ipynb failed at cell 2 .*ValueError: boom"):
        reproduce.reproduce(profile="ci", results_root=tmp_path / "results")
    assert (tmp_path / "results" / "00_bad" / "00_bad.failed.ipynb").exists()
    assert not (tmp_path / "results" / "00_bad" / "00_bad.ipynb").exists()
    assert not (tmp_path / "results" / "01_never").exists()


def test_only_filters_and_rejects_unknown_numbers(notebooks: Path):
    _notebook(notebooks / "00_a.ipynb", "1")
    _notebook(notebooks / "03_c.ipynb", "1")
    assert [p.name for p in reproduce.notebook_paths(["3"])] == ["03_c.ipynb"]
    with pytest.raises(ValueError, match="do not exist"):
        reproduce.notebook_paths(["07"])
