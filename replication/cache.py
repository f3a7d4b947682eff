"""Configuration-keyed cache: a stage's output lives under a folder named by its config hash.

A finished stage writes a `DONE.json` marker last (atomically), so a folder without it is an
unfinished run and is never mistaken for a result.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from replication import io, paths

DONE_MARKER = "DONE.json"


def canonical(config: Any) -> Any:
    """A JSON-able, order-independent form of a config (dataclasses, tuples, paths).

    A dataclass field declared with `metadata={"cache_key": False}` is left out: it says how a result
    is computed, not what it is (e.g. `TrainConfig.distributed`), so adding such a field keeps every
    existing cache key. A field declared with `metadata={"cache_key": "if_set"}` is keyed only when it
    differs from its default: an option added later keeps the keys of every result computed without it.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: canonical(getattr(config, f.name)) for f in dataclasses.fields(config)
                if _keyed(f, getattr(config, f.name))}
    if isinstance(config, dict):
        return {str(k): canonical(v) for k, v in sorted(config.items(), key=lambda kv: str(kv[0]))}
    if isinstance(config, (list, tuple)):
        return [canonical(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def _keyed(field: dataclasses.Field, value: Any) -> bool:
    rule = field.metadata.get("cache_key", True)
    return value != field.default if rule == "if_set" else bool(rule)


def config_hash(config: Any, length: int = 12) -> str:
    """Stable short hash of a configuration."""
    text = json.dumps(canonical(config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def stage_dir(kind: str, config: Any, root: Path | None = None) -> Path:
    """The folder for stage `kind` with this config: `<cache>/<kind>/<hash>/`."""
    return Path(root or paths.cache_dir()) / kind / config_hash(config)


def is_done(folder: Path) -> bool:
    return (Path(folder) / DONE_MARKER).exists()


def mark_done(folder: Path, config: Any, **extra: Any) -> None:
    """Record that the stage in `folder` finished, with the config that produced it."""
    io.write_json(Path(folder) / DONE_MARKER, {"config": canonical(config), **extra})


def done_matches(folder: Path, config: Any) -> bool:
    """Does the DONE marker in `folder` record exactly `config`?"""
    recorded = io.read_json(Path(folder) / DONE_MARKER).get("config")
    return recorded == json.loads(json.dumps(canonical(config), default=str))


@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a stage folder, so two processes never build the same stage at once.

    The second process waits, then finds the stage done (check `is_done` inside the lock) and loads it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
