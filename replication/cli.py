"""Command line: `python -m replication world|reproduce|notebooks ...`."""
from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

from replication import paths

# errno -> (what failed, what to do) for the OS errors a run meets when writing its outputs; a
# permission error may come from a read too, hence "access"
_NO_PERMISSION = ("access", "fix its permissions or choose a folder you may write to")
_OS_ADVICE = {
    errno.EROFS: ("write", "the file system is read-only; choose a writable folder"),
    errno.ENOSPC: ("write", "the disk is full; free disk space or choose a folder on another disk"),
    errno.EDQUOT: ("write", "the disk quota is used up; free space or choose another folder"),
    errno.EACCES: _NO_PERMISSION,
    errno.EPERM: _NO_PERMISSION,
}


def _world(args: argparse.Namespace) -> None:
    from replication.data.concept_world import WorldConfig, generate_world
    from replication.profiles import load_profile

    overrides = {"seed": args.seed} if args.seed is not None else {}
    config = load_profile(args.profile).build(WorldConfig, args.section, **overrides)
    out = generate_world(config, Path(args.out), overwrite=args.overwrite)
    print(f"ConceptWorld ({config.preset}, {config.n_images} images, seed {config.seed}) written to {out}")


def _reproduce(args: argparse.Namespace) -> None:
    from replication.reproduce import NotebookFailed, reproduce

    try:
        reproduce(profile=args.profile, only=args.only, results_root=args.results)
    except NotebookFailed as failure:
        sys.exit(f"error: {failure}")


def _notebooks(args: argparse.Namespace) -> None:
    from replication.reproduce import refresh_stored_outputs

    refresh_stored_outputs(only=args.only)


def _non_negative_int(text: str) -> int:
    """argparse type of `--seed`: numpy's seeds must be non-negative."""
    if not text.strip().isdecimal():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _notebook_numbers(text: str) -> list[str]:
    """argparse type of `--only`: comma-separated notebook numbers, at least one."""
    numbers = [part.strip() for part in text.split(",") if part.strip()]
    if not numbers:
        raise argparse.ArgumentTypeError(f"{text!r} names no notebook; give numbers such as 00,03, or omit --only to run all")
    return numbers


def _os_error_line(error: OSError, profile: str | None) -> str:
    """One line for an OS error: the file, the system's reason and what to do (which variable moves
    the folder, when the file lies under one of the configurable roots)."""
    verb, advice = _OS_ADVICE.get(error.errno, ("access", "check the path"))
    target = Path(error.filename) if error.filename else None
    roots = (("REPLICATION_RESULTS", paths.results_dir(profile)), ("REPLICATION_CACHE", paths.cache_dir()),
             ("REPLICATION_DATA", paths.data_dir()))
    for variable, root in roots:
        if target is not None and target.resolve().is_relative_to(root.resolve()):
            advice += f" (set {variable} to use another folder than {root})"
            break
    return f"cannot {verb} {target or 'a file'}: {error.strerror or error}; {advice}."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m replication", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    world = commands.add_parser("world", help="generate a ConceptWorld dataset in Broden format")
    world.add_argument("--profile", default="default", help="ci, default, gpu or a .toml path")
    world.add_argument("--out", required=True, help="output folder (new or empty, unless --overwrite)")
    world.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    world.add_argument("--seed", type=_non_negative_int, default=None, help="override the profile's seed (>= 0)")
    world.add_argument("--section", default="world", help="profile section: world, or cgl_world for CGL's preset")
    world.set_defaults(handler=_world)

    run = commands.add_parser("reproduce", help="execute the notebooks into results/")
    run.add_argument("--profile", default="default", help="ci, default, gpu, paper or a .toml path")
    run.add_argument("--only", type=_notebook_numbers, default=None, help="comma-separated notebook numbers, e.g. 01,03")
    run.add_argument("--results", type=Path, default=None,
                     help="results folder (default: results/ for the default profile, results-<profile>/ otherwise)")
    run.set_defaults(handler=_reproduce)

    stored = commands.add_parser("notebooks", help="re-execute notebooks/ in place under their ci parameters "
                                                   "(the outputs nbval checks; tables go to .test-results/)")
    stored.add_argument("--only", type=_notebook_numbers, default=None, help="comma-separated notebook numbers")
    stored.set_defaults(handler=_notebooks, profile="ci")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"error: {message}")
    except OSError as error:  # read-only folder, full disk, no permission: no traceback, one line
        sys.exit(f"error: {_os_error_line(error, args.profile)}")
