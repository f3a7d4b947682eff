"""UIBE's basis training throughput: pixel vectors per second through `fit_uibe`'s training steps.

Times `fit_uibe` on random pixel vectors (D = `--dim`, default 512 as ResNet-18's layer4) for I = `--directions`
(default 500, EDDP's, and D), `--epochs` epochs of `--pixels` pixels in batches of `--batch` (the spec's 4096),
one restart, on `--device` (CPU: this process's CPU time, summed over a profile's [runtime] threads). A fit
includes the standardisation and the final loss pass, so the rate slightly understates the steps' own. One
warm-up fit per setting, then `--rounds` rounds; the best round is reported as pixels/s, with the seconds an
epoch over 3.1 M pixels (ResNet-18 layer4 over Broden) would take. No budget: it sizes the notebook's epochs.
(On two shared CPU cores, D = 512: about 5,000 pixels/s; the D × D matrix exponential of the orthogonal
parametrisation, forward and backward, dominates each step.)

Then the cost of one UIBE fit relative to one dissection of the same layer: the profile's [model] network
(random weights: the cost does not depend on them) at [uibe]'s ResNet-18 layer, its features on [uibe]'s
`train_images` of the profile's world computed once; one fit with [uibe.fit] (one restart) against one
`dissect_features` of those features (natural basis, [dissection] settings), both in this process's CPU time.
(default on two shared cores: one fit ~ 6x one dissection, 10.0 s against 1.7 s.)

Last, the planted test's restarts (the profile's [uibe.planted.fit], one data seed) serially against
`workers` = the profile's threads processes, in wall time, and whether both choose the same basis.
(Two idle cores, 6 restarts of 2 seeds: 1.9x. Beside another 2-thread job: 18x, 684 s against 37 s: tiny
2-thread steps in one process stall when the cores are busy, one-thread workers do not.)

    python benchmarks/bench_interpretable_basis.py [--profile default] [--dim 512] [--directions 500 512] [--device cpu]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from replication import runtime
from replication.analysis.dissection import DissectionConfig, dissect_features
from replication.analysis.features import layer_features
from replication.data.broden import BrodenDataset
from replication.data.concept_world import WorldConfig, ensure_world
from replication.data.subsets import seeded_subset
from replication.methods.interpretable_basis import UIBEConfig, UIBESettings, fit_uibe, pixel_matrix, planted_basis_data
from replication.models.backbones import BackboneConfig
from replication.profiles import load_profile

BRODEN_PIXELS = 63_305 * 49  # ResNet-18 layer4 (7 × 7) over every Broden image


def seconds(work, device: torch.device) -> float:
    """CPU time of `work()` on the CPU (summed over threads), wall time on CUDA."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    start = clock()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def fit_seconds(pixels: torch.Tensor, config: UIBEConfig, device: torch.device) -> float:
    return seconds(lambda: fit_uibe(pixels, config, device=device), device)


def fit_against_dissection(profile_name: str, device: torch.device) -> None:
    """One UIBE fit of the profile's settings against one dissection of the same layer's features."""
    profile = load_profile(profile_name)
    settings = profile.build(UIBESettings, "uibe")
    dissection = profile.build(DissectionConfig, "dissection")
    layer = settings.layers["resnet18"]
    torch.manual_seed(0)
    model = profile.build(BackboneConfig, "model").build(num_classes=18).eval()
    images = seeded_subset(BrodenDataset(ensure_world(profile.build(WorldConfig, "world")), split="train"),
                           settings.train_images, seed=settings.subset_seed)
    features = layer_features(model, [layer], images, batch_size=dissection.batch_size, device=device)[layer]
    config = dataclasses.replace(settings.fit, restarts=1)
    fit = fit_seconds(pixel_matrix(features), config, device)
    dissect = seconds(lambda: dissect_features(features, images, device=device, layer=layer,
                                               **dissection.dissect_keywords()), device)
    print(f"{profile.name}: UIBE fit (I={config.directions}, at most {config.epochs} epochs) on {layer} "
          f"({len(images)} images, D={features.shape[1]}, {features.shape[-2]}x{features.shape[-1]}) {fit:.1f} s; "
          f"one dissection of the same features {dissect:.1f} s; ratio {fit / dissect:.1f}")


def planted_restarts_in_processes(profile_name: str, workers: int) -> None:
    """Wall time of one planted seed's restarts serially and on `workers` processes; same basis either way."""
    run = load_profile(profile_name).build(UIBESettings, "uibe").planted
    data = planted_basis_data(run.n_train, run.n_test, run.data, seed=run.seeds[0])
    fits, times = {}, {}
    for count in (1, workers):
        start = time.perf_counter()
        fits[count] = fit_uibe(data.train, run.fit, seed=run.seeds[0], device="cpu", workers=count)
        times[count] = time.perf_counter() - start
    same = torch.equal(fits[1].directions, fits[workers].directions)
    print(f"planted test, {run.fit.restarts} restarts of one data seed: serial {times[1]:.1f} s, {workers} processes "
          f"{times[workers]:.1f} s; speed-up {times[1] / times[workers]:.2f}x; same basis: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--directions", type=int, nargs="+", default=[500, 512])
    parser.add_argument("--pixels", type=int, default=4 * 4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = runtime.set_cpu_threads(load_profile(args.profile).build(runtime.RuntimeSettings, "runtime").threads)
    device = runtime.resolve_device(args.device)
    pixels = torch.randn(args.pixels, args.dim, generator=torch.Generator().manual_seed(0))
    print(f"UIBE training on {device}, threads={threads} (profile {args.profile}), D={args.dim}, "
          f"batch {args.batch}, {args.epochs} epochs of {args.pixels} pixels")
    for directions in args.directions:
        config = UIBEConfig(directions=directions, batch_size=args.batch, epochs=args.epochs)
        fit_seconds(pixels[: args.batch], UIBEConfig(directions=directions, batch_size=args.batch, epochs=1), device)
        best = min(fit_seconds(pixels, config, device) for _ in range(args.rounds))
        rate = args.pixels * args.epochs / best
        print(f"I={directions}: {rate:,.0f} pixels/s; one epoch over ResNet-18 layer4 on Broden "
              f"({BRODEN_PIXELS:,} pixels) ~ {BRODEN_PIXELS / rate:,.0f} s")
    fit_against_dissection(args.profile, device)
    planted_restarts_in_processes(args.profile, threads)


if __name__ == "__main__":
    main()
