"""Run profiles as data: `ci`, `default`, `gpu`, `paper` live in TOML files beside this module.

A profile is a set of named sections (world, train, dissection, one per paper...). Consumers turn a
section into their own config dataclass with `Profile.build`, so an unknown or misspelt key, or a
value of the wrong type, is a clear error naming the file rather than a silently ignored setting or
a traceback deep inside the consumer. Strings may use `$VAR` to read local paths (real Broden,
pretrained weights) from the environment.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

PROFILE_DIR = Path(__file__).resolve().parent
T = TypeVar("T")


class ProfileError(ValueError):
    """A profile file is malformed or holds a value of the wrong type; the message names the file."""


class Section(dict):
    """A profile section's settings; a missing key raises a KeyError naming the section and the file."""

    def __init__(self, values: Mapping[str, Any], *, label: str, file: Path):
        super().__init__(values)
        self.label, self.file = label, file

    def __missing__(self, key: str) -> Any:
        raise KeyError(f"{self.label} has no key {key!r}; add it to {self.file} (keys there: {sorted(self)}).")


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


def _conforms(value: Any, hint: Any) -> bool:
    """Does a TOML value fit the annotation `hint`? bool and int never stand in for each other, an int
    does for a float; annotations this cannot check (Any, Path, classes...) accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(_conforms, value, args))
        return all(_conforms(item, args[0]) for item in value) if args else True
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            return False
        key_hint, value_hint = args or (Any, Any)
        return all(_conforms(k, key_hint) and _conforms(v, value_hint) for k, v in value.items())
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


@dataclass(frozen=True)
class Profile:
    name: str
    sections: Mapping[str, Mapping[str, Any]]
    path: Path | None = None  # the TOML file; None = `<PROFILE_DIR>/<name>.toml`

    @property
    def file(self) -> Path:
        return self.path or PROFILE_DIR / f"{self.name}.toml"

    def section(self, name: str) -> Section:
        if name not in self.sections:
            raise KeyError(
                f"profile {self.name!r} has no [{name}] section; sections: {sorted(self.sections)}. "
                f"Add one to {self.file}."
            )
        return Section(self.sections[name], label=f"profile {self.name!r} section [{name}]", file=self.file)

    def build(self, cls: type[T], section: str, **overrides: Any) -> T:
        """Instantiate dataclass `cls` from a section (plus overrides), rejecting unknown keys and
        section values whose type does not fit the field's annotation (overrides come from code and
        are not checked)."""
        settings = self.section(section)
        values = {**settings, **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KeyError(
                f"profile {self.name!r} section [{section}] has keys {unknown} that {cls.__name__} "
                f"does not accept; valid keys: {sorted(known)}."
            )
        try:
            hints = typing.get_type_hints(cls)
        except NameError:  # an annotation names a type only visible elsewhere: nothing to check
            hints = {}
        for key, value in settings.items():
            if key not in overrides and key in hints and not _conforms(value, hints[key]):
                raise ProfileError(
                    f"{self.file} [{section}] {key} = {value!r}: {cls.__name__}.{key} expects {_type_name(hints[key])}."
                )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load a profile by name (`ci`, `default`, `gpu`, `paper`) or from a TOML file path."""
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise FileNotFoundError(f"profile file {path} not found; check the path (or use one of {available_profiles()}).")
    else:
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise FileNotFoundError(
                f"unknown profile {str(name_or_path)!r}: choose one of {available_profiles()} or pass a .toml path."
            )
    try:
        with path.open("rb") as handle:
            sections = _expand(tomllib.load(handle))
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(f"profile file {path} is not valid TOML: {error}; fix it there.") from None
    return Profile(name=path.stem, sections=sections, path=path)
