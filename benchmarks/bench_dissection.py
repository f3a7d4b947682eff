"""Network Dissection cost relative to the bare forward passes (the floor), and peak memory.

ResNet-18 (small_input, width 0.25: 16-32-64-128 channels, layer4 at 8×8 on 64-px images) with random
weights, probed at `layer4` on the ConceptWorld of a profile (default: `default`, split `val`).
Prints the time of the bare forward passes over the probe images (loader included), the time of
`dissect` over the same images, their ratio (target ≤ 1.5 on CPU) and the peak resident memory.
Usage: python benchmarks/bench_dissection.py [--profile default] [--split val] [--repeats 2]
"""
from __future__ import annotations

import argparse
import resource
import time

import replication  # noqa: F401  (before torchvision)
import torch

from replication.analysis.dissection import dissect
from replication.data.broden import BrodenDataset, broden_loader
from replication.data.concept_world import WorldConfig, ensure_world
from replication.models.backbones import build_backbone
from replication.profiles import load_profile


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.no_grad()
def bare_forward(model, dataset, batch_size: int) -> float:
    start = time.perf_counter()
    for batch in broden_loader(dataset, batch_size=batch_size):
        model(batch["image"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--split", default="val")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    profile = load_profile(args.profile)
    settings = profile.section("dissection")
    batch_size = int(settings.get("batch_size", 128))
    world = ensure_world(profile.build(WorldConfig, "world"))
    dataset = BrodenDataset(world, split=args.split)
    torch.manual_seed(0)
    model = build_backbone("resnet18", 10, small_input=True, width=0.25).eval()

    bare_forward(model, dataset, batch_size)  # warm-up: file cache, allocator, kernels
    rss_before = peak_rss_mib()
    forward_times, dissect_times = [], []
    for _ in range(args.repeats):  # interleaved, best of each: the machine is shared
        forward_times.append(bare_forward(model, dataset, batch_size))
        start = time.perf_counter()
        result = dissect(model, "layer4", dataset, batch_size=batch_size, device="cpu",
                         quantile=settings.get("quantile", 0.005), iou_threshold=settings.get("iou_threshold", 0.04))
        dissect_times.append(time.perf_counter() - start)
    forward, dissection = min(forward_times), min(dissect_times)
    units, height, width = result.config["feature_shape"]
    print(f"world {world.name} ({args.profile}), split {args.split}: {len(dataset)} images, "
          f"layer4 {units}×{height}×{width}, masks {tuple(dataset.mask_size)}, batch {batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"bare forward passes : {forward:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in forward_times)})")
    print(f"dissect             : {dissection:8.2f} s  (runs: {', '.join(f'{t:.2f}' for t in dissect_times)}; "
          f"{result.config['forward_passes']} forward pass(es), quantiles {result.config['quantile_method']})")
    print(f"ratio dissect / forward: {dissection / forward:.2f}  (target <= 1.5)")
    print(f"peak RSS: {rss_before:.0f} MiB after the warm-up forward, {peak_rss_mib():.0f} MiB after dissect")
    print(f"unique detectors (random weights): {result.unique_detectors}")


if __name__ == "__main__":
    main()
