"""Atomic writes: a result file is either complete or absent, never half-written."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from replication import paths


TEMP_SUFFIX = ".tmp"  # temp files are `.<name>.<random>.tmp` beside their target (git-ignored)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; flush it to disk and rename it onto `path` only if the block
    succeeds. The file gets the usual permissions (0666 less the umask), not a private temp file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        with open(tmp_path, "rb") as written:  # data on disk before the name: no empty file after a power cut
            os.fsync(written.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def scratch_path(path: str | os.PathLike, tag: str) -> Path:
    """This process's hidden scratch name beside `path`: `.<name>.<tag>-<pid>` (for a folder built
    there and renamed onto `path`)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{os.getpid()}"


def remove_stale_scratch(path: str | os.PathLike, tag: str) -> None:
    """Delete `scratch_path(path, tag)` folders and files left by processes that no longer run (a killed
    run's half-built output); those of live processes are kept."""
    path = Path(path)
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.{tag}-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def replace_folder(finished: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename the finished folder onto `target`; an existing `target` is first moved aside (a scratch
    name), then deleted, so `target` always holds one whole version."""
    finished, target = Path(finished), Path(target)
    if target.exists():
        old = scratch_path(target, "old")
        os.replace(target, old)
        os.replace(finished, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(finished, target)
    return target


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """`torch.save` through a temporary file, so a killed run leaves no truncated checkpoint.

    Saved through a file handle, so the archive's root folder is torch's fixed `archive/` rather than
    the random temp name: the same tensors give the same bytes.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers (`weights_only=True`).

    A pickle of other objects is refused, never run (it could execute code). That, or a file torch
    cannot read (truncated, corrupted, not written by `torch.save`), raises one ValueError naming the
    file and the fix: a damaged file in a cache stage folder is fixed by deleting that folder.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001  (damage surfaces as RuntimeError, OSError, EOFError, struct.error...)
        if isinstance(error, RuntimeError) and "CUDA" in str(error):  # map_location names a missing device
            raise
        refused = re.search(r"GLOBAL (\S+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    if refused:
        raise ValueError(
            f"{path} is not a plain state dict or container of tensors: it pickles {refused[1]}, which "
            "weights_only=True refuses (it could run code); save tensors only, e.g. torch.save(model.state_dict(), path)."
        )
    cache, where = paths.cache_dir().resolve(), path.resolve()
    inside = where.relative_to(cache).parts if where.is_relative_to(cache) else ()
    if len(inside) >= 3:  # <cache>/<kind>/<hash>/<file>
        fix = f"delete the stage folder {cache / inside[0] / inside[1]}; the next run rebuilds it"
    else:
        fix = "point to a file written by torch.save (e.g. of model.state_dict()), or re-create this one"
    raise ValueError(f"{path} is not a readable torch checkpoint (truncated, corrupted, or not written by torch.save); {fix}.")


def write_csv(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as CSV atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_figure(path: str | os.PathLike, figure) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)
