"""ConceptWorld generation speed and calibration.

Prints the seconds to generate `--n-images` (default 10,000) images at `--image-size` (default 128)
px with `--workers` processes (default 2, the target machine's cores), images per second and the
share of the 60-s budget used, then, per concept category, the distribution of concept coverage
(fraction of all mask pixels) and of the IoU ceiling of a perfect detector thresholded at the top
0.5% (spec `network_dissection_and_broden.md` section 9).

    .venv/bin/python benchmarks/bench_concept_world.py [--n-images N] [--image-size S] [--workers W]
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from replication.data.concept_world import WorldConfig, concept_coverage, generate_world

BUDGET_S = 60.0


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="classification")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = WorldConfig(preset=args.preset, n_images=args.n_images, image_size=args.image_size, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_cw_") as scratch:
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        root = generate_world(config, Path(scratch) / "world", workers=args.workers)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
        size_mb = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20
        print(f"{config.n_images} images at {config.image_size} px, {args.workers} workers: {seconds:.1f} s, "
              f"{config.n_images / seconds:.0f} images/s, {seconds / BUDGET_S:.0%} of the {BUDGET_S:.0f}-s budget "
              f"(scaled to 10,000 images: {seconds * 10_000 / config.n_images:.1f} s), {size_mb:.0f} MiB on disk")
        print(f"CPU time (user + system, all processes): {cpu:.1f} s, i.e. {cpu / args.workers:.1f} s of wall time "
              f"on {args.workers} otherwise idle cores; wall / that = {seconds / (cpu / args.workers):.2f} "
              "(above 1 when the machine is shared)")
        table = concept_coverage(root)
    print("\ncoverage (% of all mask pixels) and IoU ceiling at the top 0.5%, per category:")
    print(f"{'category':<10}{'concepts':>9}{'cov min':>9}{'median':>8}{'max':>8}"
          f"{'ceil min':>10}{'median':>8}{'max':>7}{'>=0.5':>7}")
    for category, group in table.groupby("category", sort=False):
        cov, ceiling = group["coverage"].to_numpy() * 100, group["iou_ceiling"].to_numpy()
        print(f"{category:<10}{len(group):>9}{cov.min():>9.3f}{np.median(cov):>8.3f}{cov.max():>8.2f}"
              f"{ceiling.min():>10.2f}{np.median(ceiling):>8.2f}{ceiling.max():>7.2f}{(ceiling >= 0.5).mean():>7.0%}")


if __name__ == "__main__":
    main()
