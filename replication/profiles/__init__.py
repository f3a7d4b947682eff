"""Run profiles as data: `ci`, `default`, `gpu`, `paper` live in TOML files beside this module.

A profile is a set of named sections (world, train, dissection, one per paper...). Consumers turn a
section into their own config dataclass with `Profile.build`, so an unknown or misspelt key is a
clear error rather than a silently ignored setting. Strings may use `$VAR` to read local paths
(real Broden, pretrained weights) from the environment.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

PROFILE_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _expand(value: Any) -> Any:
    if isinstance(value, str) and "$" in value:
        return os.path.expandvars(value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


@dataclass(frozen=True)
class Profile:
    name: str
    sections: Mapping[str, Mapping[str, Any]]

    def section(self, name: str) -> dict[str, Any]:
        if name not in self.sections:
            raise KeyError(
                f"profile {self.name!r} has no [{name}] section; sections: {sorted(self.sections)}. "
                f"Add one to {PROFILE_DIR / (self.name + '.toml')}."
            )
        return dict(self.sections[name])

    def build(self, cls: type[T], section: str, **overrides: Any) -> T:
        """Instantiate dataclass `cls` from a section (plus overrides), rejecting unknown keys."""
        values = {**self.section(section), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(
                f"profile {self.name!r} section [{section}] has keys {unknown} that {cls.__name__} "
                f"does not accept; valid keys: {sorted(known)}."
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load a profile by name (`ci`, `default`, `gpu`, `paper`) or from a TOML file path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise FileNotFoundError(
            f"unknown profile {str(name_or_path)!r}: choose one of {available_profiles()} or pass a .toml path."
        )
    with path.open("rb") as handle:
        sections = _expand(tomllib.load(handle))
    return Profile(name=path.stem, sections=sections)
