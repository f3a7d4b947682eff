"""The notebook runner: order, parameters, failure reporting, summary."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
        "import os, pandas as pd, pathlib\n"
        "out = pathlib.Path(os.environ['REPLICATION_RESULTS']) / '01_b'; out.mkdir(parents=True, exist_ok=True)\n"
        "pd.DataFrame([dict(paper_id='01', claim_id='X1', claim='c', paper='p', ours=profile, verdict='confirmed', "
        "note='rule', unit='seeds, n=3', seeds='0')]).to_csv(out / 'claims.csv', index=False)\n"
        "(out / 'effect.png').write_bytes(b'png')"
    )
    _notebook(notebooks / "01_b.ipynb", claims)
    _notebook(notebooks / "00_a.ipynb", "print(profile)")
    runs = reproduce.reproduce(profile="default", results_root=tmp_path / "results")
    assert [r.name for r in runs] == ["00_a", "01_b"]
    executed = nbformat.read(tmp_path / "results" / "00_a" / "00_a.ipynb", as_version=4)
    assert any("default" in o.get("text", "") for c in executed.cells for o in c.get("outputs", []))
    summary = (tmp_path / "results" / "README.md").read_text()
    assert "| 01 | X1 | c | p | default | confirmed | seeds, n=3 | rule | 0 |" in summary
    assert "| [00_a](00_a/00_a.ipynb) | default |" in summary
    assert "| [effect](01_b/effect.png) |" in summary


def test_failure_names_notebook_and_cell_and_stops(notebooks: Path, tmp_path: Path):
    _notebook(notebooks / "00_bad.ipynb", "raise ValueError('boom')")
    _notebook(notebooks / "01_never.ipynb", "print(1)")
    with pytest.raises(reproduce.NotebookFailed, match=r"00_bad\.ipynb failed at cell 2 .*ValueError: boom"):
        reproduce.reproduce(profile="ci", results_root=tmp_path / "results")
    assert (tmp_path / "results" / "00_bad.failed" / "00_bad.ipynb").exists()
    assert not (tmp_path / "results" / "00_bad").exists()
    assert not (tmp_path / "results" / "01_never").exists()


def _writes_table(name: str, value: str) -> str:
    return (f"import os, pathlib\nout = pathlib.Path(os.environ['REPLICATION_RESULTS']) / '{name}'\n"
            f"out.mkdir(parents=True, exist_ok=True)\n(out / 'table.csv').write_text('{value}')")


def test_failed_run_leaves_the_previous_results_whole(notebooks: Path, tmp_path: Path):
    results = tmp_path / "results"
    _notebook(notebooks / "00_a.ipynb", _writes_table("00_a", "first") + "\n(out / 'second.csv').write_text('x')")
    reproduce.reproduce(profile="ci", results_root=results)
    _notebook(notebooks / "00_a.ipynb", _writes_table("00_a", "changed") + "\nraise ValueError('late')")
    with pytest.raises(reproduce.NotebookFailed, match=r"00_a\.failed.*unchanged"):
        reproduce.reproduce(profile="ci", results_root=results)
    assert (results / "00_a" / "table.csv").read_text() == "first"
    assert (results / "00_a" / "second.csv").exists()
    assert (results / "00_a.failed" / "table.csv").read_text() == "changed"
    _notebook(notebooks / "00_a.ipynb", _writes_table("00_a", "third"))
    reproduce.reproduce(profile="ci", results_root=results)
    assert (results / "00_a" / "table.csv").read_text() == "third"
    assert not (results / "00_a" / "second.csv").exists()  # a run replaces the folder whole
    assert not (results / "00_a.failed").exists()
    assert sorted(p.name for p in results.iterdir()) == ["00_a", "README.md"]


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(notebooks: Path, tmp_path: Path):
    results = tmp_path / "results"
    dead = results / ".00_a.staging-999999999" / "00_a"
    dead.mkdir(parents=True)
    (dead / "partial.csv").write_text("x")
    _notebook(notebooks / "00_a.ipynb", _writes_table("00_a", "ok"))
    reproduce.reproduce(profile="ci", results_root=results)
    assert not (results / ".00_a.staging-999999999").exists()
    assert (results / "00_a" / "table.csv").read_text() == "ok"


def test_executed_notebook_and_run_record_carry_no_build_paths(notebooks: Path, tmp_path: Path):
    results = tmp_path / "results"
    _notebook(notebooks / "00_a.ipynb", "print(1)")
    reproduce.reproduce(profile="ci", results_root=results)
    text = (results / "00_a" / "00_a.ipynb").read_text()
    assert str(tmp_path) not in text
    assert nbformat.read(results / "00_a" / "00_a.ipynb", as_version=4).metadata["papermill"]["input_path"] == "notebooks/00_a.ipynb"
    record = json.loads((results / "00_a" / "run.json").read_text())
    assert record["profile"] == "ci" and record["threads"] == 2 and record["seeds"] == [0]


def test_the_run_record_names_the_commit_at_the_start_of_the_run(notebooks: Path, tmp_path: Path, monkeypatch):
    heads = iter(["c0ffee1", "beef002"])  # a commit lands while the notebook runs
    monkeypatch.setattr(reproduce, "_git_commit", lambda: next(heads))
    _notebook(notebooks / "00_a.ipynb", "print(1)")
    reproduce.reproduce(profile="ci", results_root=tmp_path / "results")
    assert json.loads((tmp_path / "results" / "00_a" / "run.json").read_text())["commit"] == "c0ffee1"


def test_a_user_kernelspec_named_python3_does_not_hijack_the_run(notebooks: Path, tmp_path: Path, monkeypatch):
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": ["/bin/false", "{connection_file}"], "display_name": "x", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    _notebook(notebooks / "00_a.ipynb", "import sys; print(sys.executable)")
    reproduce.reproduce(profile="ci", results_root=tmp_path / "results")
    executed = nbformat.read(tmp_path / "results" / "00_a" / "00_a.ipynb", as_version=4)
    assert sys.executable in executed.cells[-1].outputs[0]["text"]


def test_profiles_other_than_default_write_beside_results(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("REPLICATION_RESULTS", raising=False)
    monkeypatch.setattr(reproduce.paths, "repo_root", lambda: tmp_path)
    assert reproduce.paths.results_dir("default") == tmp_path / "results"
    assert reproduce.paths.results_dir("ci") == tmp_path / "results-ci"
    assert reproduce.paths.results_dir("/somewhere/mine.toml") == tmp_path / "results-mine"
    monkeypatch.setenv("REPLICATION_RESULTS", str(tmp_path / "elsewhere"))
    assert reproduce.paths.results_dir("ci") == tmp_path / "elsewhere"


@pytest.mark.parametrize("only", [[], [""], [" ", ""]])
def test_only_naming_no_notebook_is_an_error(notebooks: Path, only):
    _notebook(notebooks / "00_a.ipynb", "1")
    with pytest.raises(ValueError, match="names no notebook"):
        reproduce.notebook_paths(only)


def test_only_filters_and_rejects_unknown_numbers(notebooks: Path):
    _notebook(notebooks / "00_a.ipynb", "1")
    _notebook(notebooks / "03_c.ipynb", "1")
    assert [p.name for p in reproduce.notebook_paths(["3"])] == ["03_c.ipynb"]
    with pytest.raises(ValueError, match="do not exist"):
        reproduce.notebook_paths(["07"])


def test_make_test_works_in_a_path_with_spaces(tmp_path: Path):
    """The Makefile quotes its paths: `make test` in `with space/` reaches pytest with the right folder."""
    clone = tmp_path / "with space" / "clone"
    (clone / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(Path(reproduce.paths.repo_root()) / "Makefile", clone / "Makefile")
    for name in ("pyproject.toml", "constraints.txt"):
        (clone / name).write_text("")
    fake_python = clone / ".venv" / "bin" / "python"
    fake_python.write_text('#!/bin/sh\nprintf "%s" "$REPLICATION_RESULTS" > "$(dirname "$0")/seen"\n')
    fake_python.chmod(0o755)
    (clone / ".venv" / ".installed").touch()
    done = subprocess.run(["make", "test"], cwd=clone, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (clone / ".venv" / "bin" / "seen").read_text() == f"{clone}/.test-results"


def test_an_unwritable_data_folder_is_named_before_any_notebook_runs(notebooks: Path, tmp_path: Path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REPLICATION_DATA", str(blocker / "data"))
    _notebook(notebooks / "00_a.ipynb", "raise SystemExit('must not run')")
    with pytest.raises(ValueError, match=r"cannot write to .*a-file/data .*point REPLICATION_DATA to a writable folder"):
        reproduce.reproduce(profile="ci", results_root=tmp_path / "results")
    assert not (tmp_path / "results" / "00_a").exists()
