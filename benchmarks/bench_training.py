"""Seconds per training epoch of a profile's backbone, extrapolated from a few batches.

Trains the profile's [train] backbone with `replication.training.train` for one short epoch on
random images of the profile's [world] size, then scales the measured time to the profile's image
count (the train split is most of it; the estimate is deliberately for all images). Also prints the
ratio of a training step to an evaluation pass over the same images.

    python benchmarks/bench_training.py [--profile default] [--batches 10] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

import replication  # noqa: F401  (before torchvision)
from replication import runtime
from replication.models.backbones import build_backbone
from replication.profiles import load_profile
from replication.training.loop import TrainConfig, evaluate, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    profile = load_profile(args.profile)
    setup, world = profile.section("train"), profile.section("world")
    device = runtime.resolve_device(args.device or profile.section("runtime").get("device"))
    batch, size = setup["batch_size"], world["image_size"]
    n = args.batches * batch
    data = TensorDataset(torch.randn(n, 3, size, size), torch.randint(0, 10, (n,)))
    config = TrainConfig(epochs=1, batch_size=batch, lr=setup["lr"], seed=0)

    runtime.seed_everything(0)
    model = build_backbone(setup["arch"], 10, small_input=setup["small_input"], width=setup["width"])
    train(model, TensorDataset(*(t[:batch] for t in data.tensors)), config=config, device=device)  # warm-up
    seconds = train(model, data, config=config, device=device).history["seconds"].iloc[0]
    started = time.perf_counter()
    evaluate(model, data, batch_size=batch, device=device)
    eval_seconds = time.perf_counter() - started

    per_image = seconds / n
    print(f"profile={args.profile} arch={setup['arch']} width={setup['width']} small_input={setup['small_input']} "
          f"image_size={size} batch={batch} device={device} threads={torch.get_num_threads()}")
    print(f"train: {n} images in {seconds:.2f} s = {n / seconds:.0f} images/s")
    print(f"estimated epoch over {world['n_images']} images: {per_image * world['n_images']:.1f} s "
          f"(x {setup['epochs']} epochs = {per_image * world['n_images'] * setup['epochs'] / 60:.1f} min)")
    print(f"train step / eval forward time ratio: {seconds / eval_seconds:.2f}")


if __name__ == "__main__":
    main()
