"""Run the numbered notebooks with papermill into `results/`, then summarise every paper's claims.

`results/NN_name/` receives the executed notebook plus the tables and figures the notebook writes
itself. A notebook runs into a hidden staging folder that replaces `results/NN_name/` only when the
notebook succeeds, so a failed or killed run never leaves a mix of two runs: a failure keeps its
partial outputs in `results/NN_name.failed/` for inspection, and a killed run's staging folder is
removed by the next run. The run stops at the first failing notebook, naming it and the failing cell.
Profiles other than `default` write to `results-<profile>/` (see `paths.results_dir`).
"""
from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import ipykernel.kernelspec
import nbformat
import pandas as pd
import papermill
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient

from replication import io, paths
from replication.profiles import load_profile
from replication.reporting.claims import CLAIMS_FILE
from replication.runtime import RuntimeSettings, progress_enabled


RUN_RECORD = "run.json"  # per notebook: profile, runtime settings, minutes, commit; read back by `summarise`
STAGING = "staging"  # `.NN_name.staging-<pid>/`: where a notebook runs before it replaces `NN_name/`
FAILED_SUFFIX = ".failed"


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook and the failing cell."""


class CurrentPythonKernel(KernelManager):
    """A kernel of this very interpreter (the venv's), whatever `python3` kernelspec a user installed,
    talking over local sockets (IPC) rather than unencrypted TCP."""

    def __init__(self, **kwargs) -> None:
        # an absolute socket prefix: the default one is relative to whichever folder each side runs in
        sockets = Path(jupyter_runtime_dir()) / f"replication-{os.getpid()}-{secrets.token_hex(4)}"
        sockets.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(**{"transport": "ipc", "ip": str(sockets), **kwargs})

    @property
    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict())


@dataclass(frozen=True)
class NotebookRun:
    name: str
    seconds: float


def notebook_paths(only: list[str] | None = None, notebook_dir: Path | None = None) -> list[Path]:
    """`notebooks/NN_*.ipynb` in number order, optionally only those whose number is in `only`."""
    folder = notebook_dir or paths.repo_root() / "notebooks"
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if only is not None:
        wanted = {n.strip().zfill(2) for n in only if n.strip()}
        if not wanted:
            raise ValueError(f"--only names no notebook; give numbers such as 00,03 (available: {[p.name[:2] for p in found]}).")
        unknown = wanted - {p.name[:2] for p in found}
        if unknown:
            raise ValueError(
                f"--only names notebooks {sorted(unknown)} that do not exist; available: {[p.name[:2] for p in found]}"
            )
        found = [p for p in found if p.name[:2] in wanted]
    return found


def _failing_cell(executed: Path) -> str:
    notebook = nbformat.read(executed, as_version=4)
    injected = {"injected-parameters", "papermill-error-cell-tag"}
    source_cells = [c for c in notebook.cells if not injected & set(c.metadata.get("tags", []))]
    for number, cell in enumerate(source_cells, start=1):  # numbered as in the source notebook
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                lines = cell.source.strip().splitlines()
                first = lines[0] if lines else ""
                return f"cell {number} ({first[:60]!r}): {output.get('ename')}: {output.get('evalue')}"
    return "unknown cell"


def run_notebook(notebook: Path, profile: str, results_root: Path) -> NotebookRun:
    """Execute one notebook with papermill into `results_root/<name>/<name>.ipynb`, swapped in whole."""
    name = notebook.stem
    out_dir = results_root / name
    failed_dir = results_root / f"{name}{FAILED_SUFFIX}"
    for tag in (STAGING, "old"):
        io.remove_stale_scratch(out_dir, tag)
    staging_root = io.scratch_path(out_dir, STAGING)
    staged = staging_root / name
    staged.mkdir(parents=True)
    executed = staged / f"{name}.ipynb"
    start, commit = time.perf_counter(), _git_commit()  # the code that runs is the code at the start
    cell_bar = progress_enabled()  # papermill's per-cell bar, on the terminal; read before the kernel's quiet is set
    try:
        with _notebook_environment(results=staging_root):
            papermill.execute_notebook(
                str(notebook),
                str(executed),
                parameters={"profile": profile},
                cwd=str(notebook.parent),
                kernel_manager_class=CurrentPythonKernel,
                progress_bar=cell_bar,
                stdout_file=sys.stdout,
                stderr_file=sys.stderr,
            )
        _portable_metadata(executed, notebook)
        run = NotebookRun(name=name, seconds=time.perf_counter() - start)
        io.write_json(staged / RUN_RECORD, _run_record(name, profile, run.seconds, commit))
    except BaseException as error:
        shutil.rmtree(failed_dir, ignore_errors=True)
        os.replace(staged, failed_dir)
        shutil.rmtree(staging_root, ignore_errors=True)
        if not isinstance(error, Exception):  # KeyboardInterrupt: keep the partial run, stop as asked
            raise
        failed = failed_dir / f"{name}.ipynb"
        where = _failing_cell(failed) if failed.exists() else f"{type(error).__name__}: {error}"
        raise NotebookFailed(
            f"notebook {notebook.name} failed at {where}. Its partial outputs are in {failed_dir}; "
            f"{out_dir} is unchanged."
        ) from error
    io.replace_folder(staged, out_dir)
    staging_root.rmdir()
    shutil.rmtree(failed_dir, ignore_errors=True)
    return run


@contextlib.contextmanager
def _notebook_environment(results: Path) -> Iterator[None]:
    """What the kernel inherits: its results root (the staging folder) and quiet bars, which would
    otherwise be captured into the executed notebook as thousands of stderr fragments."""
    changes = {"REPLICATION_RESULTS": str(results), "REPLICATION_QUIET": "1"}
    previous = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _portable_metadata(executed: Path, source: Path) -> None:
    """Replace the build machine's absolute paths that papermill records with repository-relative ones."""
    notebook = nbformat.read(executed, as_version=4)
    record = notebook.metadata.get("papermill", {})
    record["input_path"] = _relative(source)
    record["output_path"] = f"{executed.parent.name}/{executed.name}"
    record.pop("environment_variables", None)
    with io.atomic_path(executed) as tmp:
        nbformat.write(notebook, tmp)


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(paths.repo_root().resolve()).as_posix()
    except ValueError:
        return path.name


def _run_record(name: str, profile: str, seconds: float, commit: str) -> dict:
    """The run record: what ran, under which settings (seeds, device, threads), how long, from which commit
    (HEAD when the run started: commits made while it runs are not in it)."""
    loaded = load_profile(profile)
    settings = loaded.build(RuntimeSettings, "runtime")
    return {"notebook": name, "profile": loaded.name, "seconds": round(seconds, 1),
            "seeds": list(settings.seeds), "device": settings.device, "threads": settings.threads,
            "commit": commit, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=paths.repo_root(), capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _figure_links(results_root: Path, notebook: str) -> str:
    """Markdown links to the figures (PNG) a notebook wrote, by name."""
    return ", ".join(f"[{p.stem}]({notebook}/{p.name})" for p in sorted((results_root / notebook).glob("*.png")))


def summarise(results_root: Path) -> Path:
    """Write `results/README.md`: every executed notebook with its run record and links to its figures,
    and one table of every paper's claims with our verdicts, units and rules (each notebook's `claims.csv`)."""
    tables = [pd.read_csv(p, dtype=str, keep_default_na=False) for p in sorted(results_root.glob(f"*/{CLAIMS_FILE}"))]
    records = [io.read_json(p) for p in sorted(results_root.glob(f"*/{RUN_RECORD}"))]
    lines = [
        "# Results",
        "",
        f"Generated by `python -m replication reproduce` (Python {platform.python_version()}). ConceptWorld "
        "results are not numerically comparable with the papers' values: compare directions and relative sizes.",
        "",
        "| notebook | profile | minutes | commit | finished | figures |",
        "|---|---|---|---|---|---|",
        *[f"| [{r['notebook']}]({r['notebook']}/{r['notebook']}.ipynb) | {r['profile']} | {r['seconds'] / 60:.1f} "
          f"| {r['commit']} | {r['finished']} | {_figure_links(results_root, r['notebook'])} |" for r in records],
        "",
        "## Claims",
        "",
    ]
    if tables:
        claims = pd.concat(tables, ignore_index=True)
        columns = ["paper_id", "claim_id", "claim", "paper", "ours", "verdict", "unit", "note", "seeds"]
        claims = claims[[c for c in columns if c in claims]].fillna("")
        lines.append("| " + " | ".join(claims.columns) + " |")
        lines.append("|" + "---|" * len(claims.columns))
        for row in claims.itertuples(index=False):
            lines.append("| " + " | ".join(str(v).replace("|", "/").replace("\n", " ") for v in row) + " |")
    else:
        lines.append("No notebook has written a claims table yet.")
    return io.write_text(results_root / "README.md", "\n".join(lines) + "\n")


def reproduce(profile: str = "default", only: list[str] | None = None, results_root: Path | None = None) -> list[NotebookRun]:
    """Run the notebooks in order; stop at the first failure (raising `NotebookFailed`).

    `results_root` defaults to `paths.results_dir(profile)`: `results/` for the default profile,
    `results-<profile>/` for the others.
    """
    loaded = load_profile(profile)  # fail fast on an unknown profile
    results_root = Path(results_root or paths.results_dir(loaded.name))
    notebooks = notebook_paths(only)
    for folder, variable in ((results_root, "REPLICATION_RESULTS"), (paths.data_dir(), "REPLICATION_DATA"),
                             (paths.cache_dir(), "REPLICATION_CACHE")):
        check_writable(folder, variable)
    runs = []
    for position, notebook in enumerate(notebooks, start=1):
        print(f"[{position}/{len(notebooks)}] {notebook.name} (profile {loaded.name}) -> {results_root}", flush=True)
        run = run_notebook(notebook, profile, results_root)
        print(f"[{position}/{len(notebooks)}] {notebook.name} done in {run.seconds / 60:.1f} min", flush=True)
        runs.append(run)
    summary = summarise(results_root)
    print(f"summary: {summary}")
    return runs


def refresh_stored_outputs(only: list[str] | None = None, results_root: Path | None = None) -> list[NotebookRun]:
    """Re-execute `notebooks/NN_*.ipynb` in place with their own parameters (the ci profile), storing the
    outputs that nbval checks; their tables go to `.test-results/`, never to `results/`."""
    results_root = Path(results_root or paths.repo_root() / ".test-results")
    runs = []
    for notebook in notebook_paths(only):
        start = time.perf_counter()
        executed = nbformat.read(notebook, as_version=4)
        with _notebook_environment(results=results_root):
            NotebookClient(executed, kernel_manager_class=CurrentPythonKernel, timeout=None,
                           resources={"metadata": {"path": str(notebook.parent)}}).execute()
        with io.atomic_path(notebook) as tmp:
            nbformat.write(executed, tmp)
        runs.append(NotebookRun(name=notebook.stem, seconds=time.perf_counter() - start))
        print(f"{notebook.name}: stored outputs refreshed in {runs[-1].seconds / 60:.1f} min", flush=True)
    return runs


def check_writable(folder: Path, variable: str) -> None:
    """Fail before any notebook runs when `folder` cannot be written, naming the variable that moves it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(folder / ".write-test") as probe:
            probe.write_text("")
        (folder / ".write-test").unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write to {folder} ({error.strerror}); make it writable or point {variable} to a writable folder."
        ) from error
