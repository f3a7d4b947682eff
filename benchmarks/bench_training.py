"""Training throughput (images/s) of a profile's baseline on its world, with and without each CPU lever.

Trains the profile's [model] backbone with its [train] recipe on the profile's [world] train split for
a few batches per variant, interleaved over `--rounds` rounds, and prints images/s per variant and
its ratio to the first ("png": the images decoded from PNG in every epoch, as a plain DataLoader
over `ClassificationDataset` does). Channels-last memory format and `torch.compile` are not offered: on
this CPU build (torch 2.13) a training step of a channels-last ResNet-18, and the first training step of a
`torch.compile`d one (measured 2026-12-01), each aborted the process with "double free or corruption".
- "memory": the split decoded once into tensors (`subsets.InMemoryDataset`), as `train_world_classifier` does;
- "memory+augment": in memory, with the profile's augmentation (if the profile sets none, flip_crop).

    python benchmarks/bench_training.py [--profile default] [--batches 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from torch.utils.data import Subset

import replication  # noqa: F401  (before torchvision)
from replication import runtime
from replication.data.classification import ClassificationDataset
from replication.data.concept_world import WorldConfig, ensure_world
from replication.data.subsets import InMemoryDataset
from replication.models.backbones import BackboneConfig
from replication.profiles import load_profile
from replication.training.loop import TrainConfig, train


def _seconds(model: torch.nn.Module, data, config: TrainConfig, device: torch.device) -> float:
    return float(train(model, data, config=config, device=device).history["seconds"].iloc[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    profile = load_profile(args.profile)
    model_config = profile.build(BackboneConfig, "model")
    train_config = profile.build(TrainConfig, "train")
    torch.set_num_threads(profile.section("runtime")["threads"])
    device = runtime.resolve_device(args.device)
    root = ensure_world(profile.build(WorldConfig, "world"))
    split = ClassificationDataset(root, "train")
    n = min(len(split), args.batches * train_config.batch_size)
    png = Subset(split, range(n))
    memory = InMemoryDataset(split, range(n))
    config = dataclasses.replace(train_config, epochs=1)
    augment = config.augment if config.augment != "none" else "flip_crop"
    variants = {
        "png": (png, config),
        "memory": (memory, config),
        "memory+augment": (memory, dataclasses.replace(config, augment=augment)),
    }
    runtime.seed_everything(0)
    model = model_config.build(len(split.classes))
    _seconds(model, Subset(memory, range(config.batch_size)), config, device)  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (data, variant_config) in variants.items():
            timings[name].append(_seconds(model, data, variant_config, device))
    print(f"profile={args.profile} arch={model_config.arch} width={model_config.width} small_input={model_config.small_input} "
          f"image_size={split.image_size} batch={config.batch_size} device={device} threads={torch.get_num_threads()} "
          f"images={n} rounds={args.rounds} (best round)")
    base = n / min(timings["png"])
    for name, seconds in timings.items():
        rate = n / min(seconds)
        print(f"{name:>22}: {rate:7.0f} images/s  ({rate / base:.2f}x png)")
    epoch_seconds = len(split) / (n / min(timings["memory"]))
    print(f"one epoch over the {len(split)} train images in memory: {epoch_seconds:.1f} s; x {train_config.epochs} epochs = "
          f"{epoch_seconds * train_config.epochs / 60:.1f} min per model")


if __name__ == "__main__":
    main()
