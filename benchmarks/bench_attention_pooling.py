"""LAP's cost: a training step (forward + backward, cross-entropy + the weak-evidence loss) of a network
with LAP in place of its global pool against the same step of the plain network, and the seconds per
image of LAP's own map and of each explainer of `analysis.attribution.explain`.

On random 64-px batches of the profile's [model] backbone (ResNet-18, width of the profile) and AlexNet-BN
(width 0.5), with the CPU threads of the profile's [runtime]; one warm-up step each, then `--rounds`
interleaved rounds of `--steps` steps, the best round reported. Explainers: `--images` images, one call each.

    python benchmarks/bench_attention_pooling.py [--profile default] [--batch 64] [--steps 5] [--rounds 3] [--images 32]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from replication import runtime
from replication.analysis.attribution import METHODS, explain
from replication.methods.attention_pooling import LAPConfig, WeakEvidenceLoss, insert_lap, interpretation_map
from replication.models.anatomy import anatomy_of
from replication.models.backbones import BackboneConfig, build_backbone
from replication.models.hooks import capture_activations
from replication.profiles import load_profile

CLASSES = 18


def step_seconds(model, images, labels, steps: int, term=None) -> float:
    model.train()
    start = time.perf_counter()
    layers = list(term.layers) if term is not None else []
    with capture_activations(model, layers, detach=False) as activations:
        for _ in range(steps):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(images), labels)
            if term is not None:
                loss = loss + term(model, activations, targets={"labels": labels})
            loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=32)
    args = parser.parse_args()
    profile = load_profile(args.profile)
    runtime.set_cpu_threads(profile.build(runtime.RuntimeSettings, "runtime").threads)
    model_config = profile.build(BackboneConfig, "model")
    lap = LAPConfig()
    runtime.seed_everything(0)
    images, labels = torch.randn(args.batch, 3, 64, 64), torch.randint(0, CLASSES, (args.batch,))
    for arch, width in (("resnet18", model_config.width), ("alexnet_bn", 0.5)):
        plain = build_backbone(arch, CLASSES, small_input=True, width=width)
        with_lap = build_backbone(arch, CLASSES, small_input=True, width=width)
        with_lap.load_state_dict(plain.state_dict())
        layer = anatomy_of(plain).last_conv
        (pool,) = insert_lap(with_lap, heads=CLASSES, head_mode=lap.head_mode, weight_mode=lap.weight_mode)
        term = WeakEvidenceLoss(f"{pool}.attention")
        timers = {"plain": lambda n: step_seconds(plain, images, labels, n),
                  "LAP + weak loss": lambda n: step_seconds(with_lap, images, labels, n, term)}
        best = {name: float("inf") for name in timers}
        for name in timers:
            timers[name](1)
        for _ in range(args.rounds):
            for name, timer in timers.items():
                best[name] = min(best[name], timer(args.steps) / args.steps)
        print(f"{arch} (width {width}), batch {args.batch} at 64 px: training step plain {1000 * best['plain']:.1f} ms, "
              f"LAP + weak loss {1000 * best['LAP + weak loss']:.1f} ms, ratio {best['LAP + weak loss'] / best['plain']:.2f}x")
        sample = images[:args.images]
        with_lap.eval()
        methods = {"LAP map": lambda m, x, t: interpretation_map(m, x, head=t)[0], **{name: name for name in METHODS}}
        options = {"gradcam": dict(layer=layer), "integrated_gradients": dict(steps=32)}
        for name, method in methods.items():
            start = time.perf_counter()
            explain(with_lap, sample, method, batch_size=args.batch, device="cpu", **options.get(name, {}))
            print(f"  {name:22s} {1000 * (time.perf_counter() - start) / len(sample):8.2f} ms per image")


if __name__ == "__main__":
    main()
