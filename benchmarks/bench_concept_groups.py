"""Cost of the CGL regularisers: time per training step with R_bn + L_g + L_s over a plain step.

Same model, batch and optimiser, through the shared training loop: one-epoch `train` calls of
`steps` batches, alternating plain and CGL so that load drift on a shared machine hits both alike;
the median epoch time over `repeats` (after one warm-up call each) is divided by `steps`. On CPU
the time is this process's CPU time with `--threads` threads (default 1), which other processes on
a shared machine disturb far less than wall time; on CUDA it is the loop's wall time per epoch. The plain
run has no loss terms (hence no hooks) and weight decay; the CGL run has R_bn on every conv weight
and L_g, L_s on the layers the notebook uses (`activation_layers`: every conv layer, VGG16's
conv4_3, conv5_1, conv5_2 as in the official code). `--kernel` picks how psi, L_g and L_s are computed
(`CGLConfig.kernel`: auto = the fused numba kernels on the CPU; eager = PyTorch ops, the reference).
Budget (issue 4): ratio <= 1.3. Prints one line per model; exits non-zero when a ratio is over budget.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import replication  # noqa: F401  (before torchvision)
import torch
from torch.utils.data import TensorDataset

from replication.methods.concept_groups import KERNELS, CGLConfig, activation_layers, cgl_loss_terms
from replication.models.backbones import build_backbone
from replication.models.small_cnns import TwoLayerCNN
from replication.runtime import resolve_device
from replication.training.loop import TrainConfig, train

BUDGET = 1.3
MODELS = {  # name: (architecture for the layer choice, builder)
    "two_layer_cnn": ("two_layer_cnn", lambda: TwoLayerCNN(num_classes=2, widths=(64, 128))),
    "alexnet_w0.5": ("alexnet", lambda: build_backbone("alexnet", 10, small_input=True, width=0.5)),
    "vgg16_w0.25": ("vgg16", lambda: build_backbone("vgg16", 10, small_input=True, width=0.25)),
}


def step_times(name: str, *, batch_size: int, steps: int, repeats: int, image_size: int, device, kernel: str) -> dict[bool, float]:
    """Median seconds per step of the plain (False) and the CGL (True) run of model `name`."""
    data = TensorDataset(torch.randn(batch_size * steps, 3, image_size, image_size), torch.randint(0, 2, (batch_size * steps,)))
    arch, build = MODELS[name]
    runs = {}
    for cgl in (False, True):
        torch.manual_seed(0)
        model = build()
        config = CGLConfig(activation_layers=activation_layers(arch, model), kernel=kernel)
        runs[cgl] = (model, cgl_loss_terms(model, config) if cgl else ())
    times: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(repeats + 1):
        for cgl, (model, terms) in runs.items():
            config = TrainConfig(epochs=1, batch_size=batch_size, lr=0.01, weight_decay=0.0 if cgl else 1e-4, schedule="none", seed=repeat)
            started = time.process_time() if device.type == "cpu" else None
            seconds = train(model, data, config=config, loss_terms=terms, device=device).history["seconds"].iloc[0]
            if started is not None:  # CPU time: robust to other processes on a shared machine
                seconds = time.process_time() - started
            if repeat:  # the first round warms up allocator and kernels
                times[cgl].append(seconds / steps)
    return {cgl: statistics.median(values) for cgl, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--kernel", default="auto", choices=KERNELS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    over = False
    for name in args.models:
        times = step_times(name, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats, image_size=args.image_size, device=device, kernel=args.kernel)
        ratio = times[True] / times[False]
        over |= ratio > BUDGET
        print(
            f"{name:14s} device={device.type} kernel={args.kernel} batch={args.batch_size} plain={times[False] * 1e3:7.1f} ms/step "
            f"cgl={times[True] * 1e3:7.1f} ms/step ratio={ratio:.2f} (budget {BUDGET})",
            flush=True,
        )
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
