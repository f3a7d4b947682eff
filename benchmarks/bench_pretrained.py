"""EfficientNet-Lite0 (ImageNet weights from its pip package) on the CPU: images/s of inference and training.

Times, at each image size, the forward pass in eval mode under no_grad ("forward") and a forward +
backward pass in train mode (cross-entropy on random labels, gradients zeroed each step: "train step"),
on random batches, with the CPU threads of a profile's [runtime]. One warm-up step per variant, then
`--rounds` interleaved rounds of `--steps` steps each; the best round is reported, with the ratio of
train step to forward at each size.

    python benchmarks/bench_pretrained.py [--profile default] [--sizes 128 224] [--batch 16] [--steps 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from replication import runtime
from replication.models.pretrained import pretrained
from replication.profiles import load_profile


def forward_seconds(model: torch.nn.Module, images: torch.Tensor, steps: int) -> float:
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            model(images)
    return time.perf_counter() - start


def train_step_seconds(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float:
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    threads = runtime.set_cpu_threads(load_profile(args.profile).build(runtime.RuntimeSettings, "runtime").threads)
    runtime.seed_everything(0)
    model = pretrained(device="cpu")
    labels = torch.randint(0, 1000, (args.batch,))
    batches = {size: torch.randn(args.batch, 3, size, size) for size in args.sizes}
    timers = {"forward": lambda images, steps: forward_seconds(model, images, steps),
              "train step": lambda images, steps: train_step_seconds(model, images, labels, steps)}
    timings = {(size, kind): float("inf") for size in args.sizes for kind in timers}
    for size, kind in timings:  # warm-up: one step of each variant at its batch shape
        timers[kind](batches[size], 1)
    for _ in range(args.rounds):
        for size, kind in timings:
            timings[size, kind] = min(timings[size, kind], timers[kind](batches[size], args.steps))
    print(f"EfficientNet-Lite0 (timm tf_efficientnet_lite0), CPU, threads={threads} (profile {args.profile}), "
          f"batch={args.batch}, {args.steps} steps per round, best of {args.rounds} rounds after a warm-up")
    for size in args.sizes:
        rates = {kind: args.batch * args.steps / timings[size, kind] for kind in ("forward", "train step")}
        print(f"{size:4d} px: forward {rates['forward']:7.1f} images/s, train step {rates['train step']:7.1f} images/s "
              f"(train step / forward time: {rates['forward'] / rates['train step']:.2f}x)")


if __name__ == "__main__":
    main()
