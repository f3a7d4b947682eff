"""What every notebook does the same way: its run context (determinism, device, batch size, seeds,
dissection settings, reference numbers), its results folder, saving shown figures and tables.

    ctx = notebook_context("03_concept_group_learning", profile="ci")
    ctx.device, ctx.batch_size, ctx.seeds, ctx.dissection, ctx.reference
    ctx.show(fig, "detectors")          # saves results/03_.../detectors.png, displays it, closes it
    ctx.save_table(frame, "accuracy")   # saves results/03_.../accuracy.csv
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from replication import io, paths, runtime
from replication.analysis.dissection import DissectionConfig
from replication.profiles import Profile, load_profile
from replication.reporting.claims import load_reference

FIGURE_SIZE = (8.0, 4.5)
FIGURE_DPI = 90


@dataclass
class RunContext:
    """Everything a notebook reads from its profile once: the profile, the results folder, the
    [runtime] settings (`seeds`, `batch_size`, `device` resolved once, the pinned CPU `threads`, which
    also sizes process pools) and the [dissection] settings,
    with helpers that write outputs atomically. `reference`: the paper's numbers (`load_reference`).
    """

    name: str
    profile: Profile
    out_dir: Path
    seeds: tuple[int, ...]
    device: torch.device
    batch_size: int
    threads: int
    dissection: DissectionConfig

    @functools.cached_property
    def reference(self) -> dict[str, Any]:
        return load_reference(self.name)

    def show(self, figure, name: str) -> None:
        """Save `figure` as `<out_dir>/<name>.png`, display it once, and close it (no stray reprs)."""
        import matplotlib.pyplot as plt

        path = io.save_figure(self.out_dir / f"{name}.png", figure)
        try:
            from IPython.display import Image, display

            display(Image(filename=str(path)))
        except ImportError:  # outside IPython: the file is the output
            pass
        plt.close(figure)

    def save_table(self, frame: pd.DataFrame, name: str) -> None:
        """Save `frame` as `<out_dir>/<name>.csv`, keeping a named index as columns."""
        io.write_csv(self.out_dir / f"{name}.csv", frame.reset_index() if _has_named_index(frame) else frame)


def _has_named_index(frame: pd.DataFrame) -> bool:
    return any(name is not None for name in frame.index.names)


def notebook_context(name: str, profile: str, seed: int = 0) -> RunContext:
    """Seed everything, pin torch's CPU threads to the profile's `[runtime] threads`, fix matplotlib's
    backend and figure size, and create `results/<name>/` (`results-<profile>/<name>/` for a profile
    other than default). [runtime] and [dissection] go through `Profile.build`, so an unknown key fails."""
    os.environ.setdefault("MPLBACKEND", "agg")
    import matplotlib

    matplotlib.use(os.environ["MPLBACKEND"])
    matplotlib.rcParams.update({"figure.figsize": FIGURE_SIZE, "figure.dpi": FIGURE_DPI})
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 20)
    runtime.seed_everything(seed)
    loaded = load_profile(profile)
    settings = loaded.build(runtime.RuntimeSettings, "runtime")
    runtime.set_cpu_threads(settings.threads)
    out_dir = paths.results_dir(loaded.name) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(name=name, profile=loaded, out_dir=out_dir, seeds=settings.seeds,
                      device=runtime.resolve_device(settings.device), batch_size=settings.batch_size,
                      threads=settings.threads,
                      dissection=loaded.build(DissectionConfig, "dissection"))
