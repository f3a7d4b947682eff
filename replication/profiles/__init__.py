"""Run profiles as data: `ci`, `default`, `gpu`, `paper` live in TOML files beside this module.

A profile is a set of named sections (runtime, world, train, dissection, one per paper...). Consumers
turn a section into their own config dataclass with `Profile.build`, so an unknown, misspelt or
missing key, or a value of the wrong type, is a clear error naming the file rather than a silently
ignored setting or a traceback deep inside the consumer. A nested table (`[cgl.train]`) builds the
section's dataclass-typed field of that name, so a settings class holds its sub-configs rather than
mirroring their fields. Strings may use `$VAR` to read local paths (real Broden, pretrained weights)
from the environment; a section that reads an unset variable is refused when it is read (`section`,
`build`), naming the variable, so the profile itself loads without them (listing, other sections).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union

PROFILE_DIR = Path(__file__).resolve().parent
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")  # what os.path.expandvars leaves when the variable is unset
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


def _unset_variables(value: Any, key: str) -> list[tuple[str, str]]:
    """(variable, dotted key) for every `$VAR` still in `value` after expansion, i.e. every unset variable."""
    if isinstance(value, str):
        return [(braced or bare, key) for braced, bare in _VARIABLE.findall(value)]
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _unset_variables(v, f"{key}.{k}" if key else k)]
    if isinstance(value, list):
        return [found for v in value for found in _unset_variables(v, key)]
    return []


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
    if _is_dataclass_type(hint):
        return isinstance(value, Mapping)
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
        unset = _unset_variables(self.sections[name], "")
        if unset:
            names = ", ".join(f"{variable} ({key})" for variable, key in unset)
            raise ProfileError(f"{self.file} [{name}] reads environment variables that are not set: {names}; set them "
                               f"to local paths (the file's comments say what each holds) and run again.")
        return Section(self.sections[name], label=f"profile {self.name!r} section [{name}]", file=self.file)

    def build(self, cls: type[T], section: str, **overrides: Any) -> T:
        """Instantiate dataclass `cls` from a section, plus `overrides` (from code, not type-checked).

        A field annotated with a dataclass is built the same way from a nested table (`[cgl.train]`
        builds `CGLSettings.train`), over the field's default when it has one, so the table only lists
        what differs. An unknown key, a missing required key or a value whose type does not fit the
        field's annotation is an error naming the file, the table and the key.
        """
        return self._build(cls, self.section(section), f"[{section}]", overrides, base=None)

    def _build(self, cls: type[T], values: Mapping[str, Any], table: str, overrides: Mapping[str, Any], base: T | None) -> T:
        """`cls` from one table's `values`; `base`: the instance whose other fields are kept (a nested field's default)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted((set(values) | set(overrides)) - set(fields))
        if unknown:
            raise KeyError(f"{self.file} {table} has keys {unknown} that {cls.__name__} does not accept; "
                           f"valid keys: {sorted(fields)}.")
        hints = _annotations(cls)
        chosen: dict[str, Any] = {}
        for key, value in values.items():
            if key in overrides:
                continue
            hint = hints.get(key)
            if _is_dataclass_type(hint) and isinstance(value, Mapping):
                inner = getattr(base, key) if base is not None else _default(fields[key])
                chosen[key] = self._build(hint, value, f"{table[:-1]}.{key}]", {}, base=inner)
            elif hint is not None and not _conforms(value, hint):
                raise ProfileError(f"{self.file} {table} {key} = {value!r}: {cls.__name__}.{key} expects {_type_name(hint)}.")
            else:
                chosen[key] = value
        chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in {**chosen, **overrides}.items()}
        if base is not None:
            return dataclasses.replace(base, **chosen)
        missing = sorted(name for name, f in fields.items() if f.init and name not in chosen and _required(f))
        if missing:
            raise KeyError(f"{self.file} {table} lacks keys {missing} that {cls.__name__} needs (they have no default); add them there.")
        return cls(**chosen)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _default(field: dataclasses.Field) -> Any:
    """A field's default value; None when it has none."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _is_dataclass_type(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _annotations(cls: type) -> dict[str, Any]:
    """The resolved field annotations of `cls`; empty when one names a type only visible elsewhere (nothing to check)."""
    try:
        return typing.get_type_hints(cls)
    except NameError:
        return {}


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
