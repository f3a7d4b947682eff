"""Command line: `python -m replication world|reproduce ...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _world(args: argparse.Namespace) -> None:
    from replication.data.concept_world import WorldConfig, generate_world
    from replication.profiles import load_profile

    overrides = {"seed": args.seed} if args.seed is not None else {}
    config = load_profile(args.profile).build(WorldConfig, args.section, **overrides)
    out = generate_world(config, Path(args.out), overwrite=args.overwrite)
    print(f"ConceptWorld ({config.preset}, {config.n_images} images, seed {config.seed}) written to {out}")


def _reproduce(args: argparse.Namespace) -> None:
    from replication.reproduce import NotebookFailed, reproduce

    only = [part.strip() for part in args.only.split(",") if part.strip()] if args.only else None
    try:
        reproduce(profile=args.profile, only=only)
    except NotebookFailed as failure:
        sys.exit(f"error: {failure}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m replication", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    world = commands.add_parser("world", help="generate a ConceptWorld dataset in Broden format")
    world.add_argument("--profile", default="default", help="ci, default, gpu or a .toml path")
    world.add_argument("--out", required=True, help="output folder (new or empty, unless --overwrite)")
    world.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    world.add_argument("--seed", type=int, default=None, help="override the profile's seed")
    world.add_argument("--section", default="world", help="profile section: world, or cgl_world for CGL's preset")
    world.set_defaults(handler=_world)

    run = commands.add_parser("reproduce", help="execute the notebooks into results/")
    run.add_argument("--profile", default="default", help="ci, default, gpu, paper or a .toml path")
    run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,03")
    run.set_defaults(handler=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.exit(f"error: {message}")
