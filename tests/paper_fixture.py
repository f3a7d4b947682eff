"""A tiny `paper`-profile fixture: files in the formats a user's real data and checkpoints come in.

`write_paper_fixture(root)` writes
- `broden/`: a Broden folder in the `broden1_224` layout (`tests.broden_fixture.write_tiny_broden`);
- `imagenet/train|val/<wnid>/*.png`: ImageFolder class folders, as an ImageNet copy (five classes:
  NAD's 2x2 mosaics need four distinct ones);
- `places365/train|val/<class>/*.png`: as a Places365 copy, one image per class and split, 365
  classes: the Places365 ResNet-18 is scored on them, and its 365 outputs must match the folders;
- `weights/`: randomly initialised full-size checkpoints of the archs whose files paper.toml reads:
  resnet18 as CSAIL's Places365 files (`{"epoch", "arch", "state_dict": {"module.<key>": tensor}}`,
  DataParallel's prefix, no BatchNorm `num_batches_tracked`: the files predate it, 365 classes), the
  others as torchvision's bare state dicts (DenseNet-121 with torchvision's legacy `norm.1` names)
  with one output per fixture class, since notebook 05 builds them with the ImageFolder's class count.

Full-size files are large (resnet18 43 MiB, densenet121 27 MiB, resnet50 89 MiB, vgg16 512 MiB, about
4 s in all), so `archs` writes only the ones a test needs; shapes are never shrunk, which would make
the files unlike the real ones. It returns the environment variables paper.toml reads, by name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from replication import io
from replication.models.backbones import build_backbone
from tests.broden_fixture import write_tiny_broden

# every environment variable paper.toml reads (a test checks this against the file)
PAPER_VARIABLES = ("BRODEN_DIR", "IMAGENET_DIR", "PLACES365_DIR", "RESNET18_PLACES365_WEIGHTS", "VGG16_WEIGHTS", "RESNET50_WEIGHTS",
                   "DENSENET121_WEIGHTS")
# ImageNet-style WordNet ids as class folder names, each with the colour its images are tinted by
CLASS_TINTS = {"n01440764": (127, 0, 0), "n01443537": (0, 127, 0), "n01484850": (0, 0, 127),
               "n01491361": (127, 127, 0), "n01494475": (0, 127, 127)}
CLASSES = tuple(CLASS_TINTS)
IMAGES_PER_CLASS = {"train": 4, "val": 2}
IMAGE_SIZE = 32
PLACES365_CLASSES = 365
PLACES_TINTS = {f"place{n:03d}": (n % 128, (7 * n) % 128, (13 * n) % 128) for n in range(PLACES365_CLASSES)}
LEGACY_DENSE_LAYER = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")  # norm1. -> norm.1.
# arch -> (environment variable, file name, class count, CSAIL Places365 format?)
WEIGHT_FILES = {
    "resnet18": ("RESNET18_PLACES365_WEIGHTS", "resnet18_places365.pth.tar", PLACES365_CLASSES, True),
    "vgg16": ("VGG16_WEIGHTS", "vgg16.pth", len(CLASSES), False),
    "resnet50": ("RESNET50_WEIGHTS", "resnet50.pth", len(CLASSES), False),
    "densenet121": ("DENSENET121_WEIGHTS", "densenet121.pth", len(CLASSES), False),
}


def write_paper_fixture(root: str | Path, *, archs: Sequence[str] = tuple(WEIGHT_FILES), seed: int = 0) -> dict[str, str]:
    """Write the fixture under `root`; return {variable: path} for BRODEN_DIR, IMAGENET_DIR,
    PLACES365_DIR and the weight variables of `archs`."""
    unknown = sorted(set(archs) - set(WEIGHT_FILES))
    if unknown:
        raise ValueError(f"no paper weights for {unknown}; choose among {sorted(WEIGHT_FILES)}.")
    root = Path(root)
    write_tiny_broden(root / "broden", seed=seed)
    write_image_folders(root / "imagenet", seed=seed)
    write_image_folders(root / "places365", PLACES_TINTS, {"train": 1, "val": 1}, seed=seed)
    environment = {"BRODEN_DIR": str(root / "broden"), "IMAGENET_DIR": str(root / "imagenet"),
                   "PLACES365_DIR": str(root / "places365")}
    torch.manual_seed(seed)
    for arch in archs:
        variable, name, num_classes, csail = WEIGHT_FILES[arch]
        state = build_backbone(arch, num_classes).state_dict()
        payload = csail_checkpoint(arch, state) if csail else torchvision_state_dict(arch, state)
        environment[variable] = str(io.save_torch(root / "weights" / name, payload))
    return environment


def write_image_folders(root: Path, tints: dict[str, tuple[int, int, int]] = CLASS_TINTS,
                        counts: dict[str, int] = IMAGES_PER_CLASS, *, seed: int = 0) -> None:
    """`root/<split>/<class>/<n>.png` (`counts[split]` per class): small RGB images, each class
    tinted by its own colour (`tints`: class folder name -> RGB)."""
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for name, tint in tints.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 128, size=(IMAGE_SIZE, IMAGE_SIZE, 3)) + np.array(tint)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{index}.png")


def csail_checkpoint(arch: str, state: dict[str, torch.Tensor]) -> dict:
    """CSAIL's Places365 training checkpoint: DataParallel-prefixed keys, no `num_batches_tracked`."""
    return {"epoch": 90, "arch": arch,
            "state_dict": {f"module.{key}": value for key, value in state.items() if not key.endswith("num_batches_tracked")}}


def torchvision_state_dict(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's published file: the bare state dict; DenseNet's dense layers under their legacy
    names (`norm.1` for `norm1`), which torchvision renames on loading."""
    if arch != "densenet121":
        return state
    return {LEGACY_DENSE_LAYER.sub(r"\1.\2.", key): value for key, value in state.items()}
