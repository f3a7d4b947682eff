"""Image classification datasets: ConceptWorld's `tasks.csv` or an ImageFolder tree of real images.

Layouts, checked in this order:
- ConceptWorld: `root/tasks.csv` (`image,split,class_id,class_name,superclass`), images under
  `root/images/`, class names and the two-level hierarchy from `root/classes.json`;
- ImageFolder (real data, `paper` profile): `root/<split>/<class>/*.{jpg,jpeg,png,...}`, classes
  sorted by name; an optional `root/hierarchy.json` ({superclass: [class, ...]}) gives the
  superclasses, otherwise each class is its own superclass.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from replication.data.broden import IMAGENET_MEAN, IMAGENET_STD, world_fix

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path: str | Path, *, size: tuple[int, int] | None, mean: torch.Tensor, std: torch.Tensor,
               box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """RGB image → float tensor 3×H×W in [0, 1], normalised by `mean`/`std` (3×1×1 tensors).

    `box` = (top, left, bottom, right) crops first; `size` = (height, width) resizes bilinearly.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if box is not None:
        top, left, bottom, right = box
        image = image.crop((left, top, right, bottom))
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
    return pixels.sub_(mean).div_(std)


def _as_size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image_size must be a positive int or (height, width); got {image_size!r}.")
    return (int(size[0]), int(size[1]))


def _stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need three values each, std positive; got mean={mean}, std={std}.")
    return torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


class ImageFileError(ValueError):
    """A dataset image cannot be decoded; the message names the file, where it is listed, and the fix."""


class ClassificationDataset(Dataset):
    """(normalised image tensor, class_id) pairs of one split.

    Attributes: `classes` (names by class id), `superclasses` (names), `superclass_of` (per class
    id, index into `superclasses`), `rules` (per class id, a ConceptWorld class's rule: concept family
    "scene", "object", "part", "color" or "material" -> concept name; empty for an ImageFolder class
    and the `cgl_shapes` preset's),
    `targets` (class id per sample), `paths`, `layout` ("conceptworld" or "imagefolder"),
    `fingerprint` (hash of the file list and settings, for caches).
    """

    def __init__(self, root: str | Path, split: str, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, image_size: int | tuple[int, int] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.root = Path(root)
        self.split = split
        self.image_size = _as_size(image_size)
        self._mean, self._std = _stats(mean, std)
        self.mean, self.std = tuple(mean), tuple(std)
        self.transform = transform
        if (self.root / "tasks.csv").is_file():
            self.layout = "conceptworld"
            self._read_conceptworld()
        elif (self.root / split).is_dir():
            self.layout = "imagefolder"
            self._read_imagefolder()
        else:
            raise FileNotFoundError(
                f"{self.root} holds neither tasks.csv (ConceptWorld: generate one with `python -m replication world "
                f"--profile ci --out DIR`) nor a {split}/ folder of class subfolders (ImageFolder layout "
                f"root/{split}/<class>/*.jpg); point root at one of them."
            )
        self.superclass_of = [self.superclasses.index(s) for s in self._superclass_names]
        digest = hashlib.sha256(json.dumps([self.layout, split, self.classes, self.image_size, self.mean, self.std])
                                .encode())
        for path, target in zip(self.paths, self.targets):
            digest.update(f"{path.relative_to(self.root)}\0{target}\n".encode())
        if (self.root / "world.json").is_file():  # a ConceptWorld: its generator and config identify the pixels
            digest.update((self.root / "world.json").read_bytes())
        self.fingerprint = digest.hexdigest()[:16]

    def _read_conceptworld(self) -> None:
        tasks = pd.read_csv(self.root / "tasks.csv", keep_default_na=False)
        missing = {"image", "split", "class_id"} - set(tasks.columns)
        if missing:
            raise ValueError(f"{self.root / 'tasks.csv'} lacks columns {sorted(missing)}; regenerate the world.")
        if self.split not in set(tasks["split"]):
            raise ValueError(f"{self.root / 'tasks.csv'} has no images of split {self.split!r}; "
                             f"splits present: {sorted(set(tasks['split']))}.")
        table = json.loads((self.root / "classes.json").read_text())["classes"]
        self.classes = [entry["name"] for entry in table]
        self.rules = [{family: str(concept) for family, concept in entry.get("rule", {}).items()} for entry in table]
        self._superclass_names = [entry["superclass"] for entry in table]
        self.superclasses = list(dict.fromkeys(self._superclass_names))
        rows = tasks[tasks["split"] == self.split]
        self.paths = [self.root / "images" / name for name in rows["image"]]
        self.targets = rows["class_id"].astype(int).tolist()
        self._lines = (rows.index + 2).tolist()  # tasks.csv line of each sample (line 1 is the header)

    def _read_imagefolder(self) -> None:
        folder = self.root / self.split
        self.classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"{folder} has no class subfolders; expected {folder}/<class>/*.jpg.")
        self.rules = [{} for _ in self.classes]
        self.paths, self.targets = [], []
        for class_id, name in enumerate(self.classes):
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            self.paths += files
            self.targets += [class_id] * len(files)
        if not self.paths:
            raise FileNotFoundError(f"{folder} has class folders but no images ({', '.join(IMAGE_SUFFIXES)}).")
        hierarchy_file = self.root / "hierarchy.json"
        if hierarchy_file.is_file():
            hierarchy = json.loads(hierarchy_file.read_text())
            parent = {c: s for s, members in hierarchy.items() for c in members}
            orphans = [c for c in self.classes if c not in parent]
            if orphans:
                raise ValueError(f"{hierarchy_file} assigns no superclass to {orphans[:5]}; add them.")
            self._superclass_names = [parent[c] for c in self.classes]
            self.superclasses = list(hierarchy)
        else:
            self._superclass_names = list(self.classes)
            self.superclasses = list(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            image = load_image(self.paths[i], size=self.image_size, mean=self._mean, std=self._std)
        except OSError as error:
            raise self._unreadable(i, error) from None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]

    def _unreadable(self, i: int, error: OSError) -> Exception:
        """The error for sample `i`'s image being missing or undecodable: the file, its tasks.csv line, the fix."""
        if self.layout == "conceptworld":
            image, fix = f"{self.paths[i]} (tasks.csv line {self._lines[i]})", f"replace the file, or {world_fix(self.root)}"
        else:
            image, fix = str(self.paths[i]), "replace or delete the file"
        if isinstance(error, FileNotFoundError):
            return FileNotFoundError(f"image {image} is missing; {fix}.")
        reason = "not a readable image" if isinstance(error, UnidentifiedImageError) else error
        return ImageFileError(f"image {image} cannot be read ({reason}); {fix}.")


class ConceptImageDataset(Dataset):
    """Concept image sets as tensors: (normalised crop resized to `image_size`, concept index).

    `sets`: {concept: DataFrame with image, top, left, bottom, right}, as returned by
    `concept_world.concept_image_sets`; concepts are indexed in the dict's order (`concepts`).
    """

    def __init__(self, root: str | Path, sets: dict[str, pd.DataFrame], *, image_size: int | tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.root = Path(root)
        self.concepts = list(sets)
        self.image_size = _as_size(image_size)
        self._mean, self._std = _stats(mean, std)
        self.items = [(self.root / "images" / row.image, (int(row.top), int(row.left), int(row.bottom), int(row.right)), c)
                      for c, concept in enumerate(self.concepts) for row in sets[concept].itertuples()]
        self.targets = [c for _, _, c in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, box, concept = self.items[i]
        return load_image(path, size=self.image_size, mean=self._mean, std=self._std, box=box), concept
