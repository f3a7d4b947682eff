"""A training step with a concept whitening layer (alignment amortised) vs the same step with BatchNorm.

The profile's [model] backbone (default: ResNet-18 width 0.125, small input) on random 64-px images,
one SGD step per batch; the CW variant replaces [cw] layers.resnet18 (block 8) and runs the alignment
callback every `--interval` batches (the paper's 20 by default) with one concept batch per node of a
16-node tree (random crops: only the cost is measured). Both variants are timed in the same process,
interleaved over `--rounds` rounds; the ratio is CW seconds per step (alignment included) over BN's.
Also printed: the alignment call alone, in BN steps.

Budget (issue 17): ratio <= 1.3. Exits non-zero when the ratio is over budget.

    python benchmarks/bench_concept_whitening.py [--profile default] [--steps 40] [--interval 20] [--rounds 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import replication  # noqa: F401  (before torchvision)
from replication.methods.concept_whitening import ConceptAlignment, ConceptSets, ConceptTree, replace_with_cw
from replication.models.backbones import BackboneConfig
from replication.profiles import load_profile

BUDGET = 1.3


def _tree() -> ConceptTree:
    """ConceptWorld's shape: 5 groups over 11 leaves (16 axes)."""
    nodes = [f"group{i}" for i in range(5)] + [f"leaf{i}" for i in range(11)]
    return ConceptTree(tuple(nodes), tuple([None] * 5 + [f"group{i % 5}" for i in range(11)]))


def _sets(tree: ConceptTree, size: int, per_leaf: int = 64) -> ConceptSets:
    leaf = torch.arange(len(tree.leaves)).repeat_interleave(per_leaf)
    members = {n: torch.cat([torch.nonzero(leaf == tree.leaves.index(l)).flatten() for l in tree.leaves_under(n)])
               for n in tree.nodes}
    return ConceptSets(tree, torch.randn(len(leaf), 3, size, size), leaf, members)


def _run(model: nn.Module, batches, optimizer, callback=None, *, first_step: int = 1) -> float:
    model.train()
    started = time.perf_counter()
    for index, (images, labels) in enumerate(batches):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if callback is not None:
            with torch.no_grad():
                callback(model, step=first_step + index, epoch=1)
    return (time.perf_counter() - started) / len(batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.steps % args.interval:
        parser.error("--steps must be a multiple of --interval, so that every round amortises whole alignments")

    profile = load_profile(args.profile)
    torch.set_num_threads(profile.section("runtime")["threads"])
    layer = profile.section("cw")["layers"]["resnet18"]
    torch.manual_seed(0)
    base = profile.build(BackboneConfig, "model").build(18)
    bn, whitened = base, copy.deepcopy(base)
    replace_with_cw(whitened, [layer])
    tree = _tree()
    callback = ConceptAlignment((layer,), tree, "benchmark", interval=args.interval, concept_batch=args.batch_size,
                                concepts=_sets(tree, args.image_size))
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size), torch.randint(0, 18, (args.batch_size,)))
               for _ in range(args.steps)]
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in (("bn", bn), ("cw", whitened))}
    _run(bn, batches[:2], optimizers["bn"])  # warm-up
    _run(whitened, batches[:2], optimizers["cw"])
    times: dict[str, list[float]] = {"bn": [], "cw": [], "cw_no_alignment": [], "alignment": []}
    for _ in range(args.rounds):
        times["bn"].append(_run(bn, batches, optimizers["bn"]))
        times["cw"].append(_run(whitened, batches, optimizers["cw"], callback))
        times["cw_no_alignment"].append(_run(whitened, batches, optimizers["cw"]))
        started = time.perf_counter()
        with torch.no_grad():
            callback.align(whitened, step=1)
        times["alignment"].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in times.items()}
    ratio = best["cw"] / best["bn"]
    print(f"ResNet-18 ({args.profile} profile's [model]), batch {args.batch_size} at {args.image_size} px, CW at {layer}, "
          f"{len(tree.nodes)} concept nodes, alignment every {args.interval} steps (best of {args.rounds} rounds)")
    print(f"BN step {1000 * best['bn']:.1f} ms; CW step without alignment {1000 * best['cw_no_alignment']:.1f} ms "
          f"({best['cw_no_alignment'] / best['bn']:.2f}x); one alignment call {1000 * best['alignment']:.0f} ms "
          f"({best['alignment'] / best['bn']:.1f} BN steps)")
    print(f"CW step with alignment amortised / BN step: {ratio:.2f}x (budget <= {BUDGET}x)")
    return 0 if ratio <= BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
