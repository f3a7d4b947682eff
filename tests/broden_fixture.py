"""A tiny hand-made Broden-format dataset with its exact ground truth, for reader and dissection tests.

`write_tiny_broden(root)` draws 1-3 shapes (disk, triangle, square, board) on a scene-coloured
background, on the sh×sw mask grid, and writes the image at twice that size (pixel-exact, PNG).
It covers the format features of spec section 9:

- object = shape masks; colour = the pixel colour of every pixel (always present);
- part: plane 1 = top/bottom half of each disk/triangle/square, plane 2 (images 0, 3, 6, …) = their
  left/right half, so those rows hold two `;`-joined part files; rows without such shapes have none;
- material in even-numbered images only (wood or metal per shape);
- scene = background type (one label); texture: none, one, or two `;`-joined labels (i % 4 == 3);
- label 21 "wood" is both a material and an object (the board), so it lists two categories;
- labels 300 ("square") and 513 ("right") are > 255, so masks need R + 256·G; B is set to 7 and must
  be ignored; train/val splits; empty cells.

Everything the files say is kept in `TinyBroden` (images, masks, labels, per-category counts and
coverage) and helper methods compute the expected reader output independently of the reader.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CATEGORY_ORDER = ("color", "object", "part", "material", "scene", "texture")
PIXEL_ORDER = ("color", "object", "material", "part")
INDEX_HEADER = ("image", "split", "ih", "iw", "sh", "sw", *CATEGORY_ORDER)

COLORS = {1: ("red", (220, 40, 40)), 2: ("green", (40, 170, 60)), 3: ("blue", (40, 70, 220)),
          4: ("yellow", (230, 210, 40)), 5: ("white", (245, 245, 245)), 6: ("gray", (128, 128, 128))}
SHAPES = {"disk": 10, "triangle": 11, "square": 300, "board": 21}
MATERIAL_OF = {"disk": 21, "triangle": 22, "square": 22, "board": 21}
SCENES = {50: ("indoor", 6), 51: ("outdoor", 2), 52: ("underwater", 3)}  # label -> (name, background colour)
TEXTURES = {60: "striped", 61: "dotted", 62: "chequered"}
LABEL_NAMES = {
    **{n: name for n, (name, _) in COLORS.items()},
    10: "disk", 11: "triangle", 300: "square", 21: "wood", 22: "metal",
    40: "top", 41: "bottom", 42: "left", 513: "right",
    **{n: name for n, (name, _) in SCENES.items()}, **TEXTURES,
}
BLUE_JUNK = 7  # the B channel of masks is unused; a non-zero value checks that readers ignore it


@dataclass(frozen=True)
class TinyImage:
    """One row of index.csv and what its files hold."""

    name: str  # path under images/
    split: str
    line: int  # line in index.csv (the header is line 1)
    pixels: np.ndarray  # H×W×3 uint8, as written
    masks: dict[str, list[np.ndarray]]  # pixel category -> planes of global label numbers (sh×sw, int64)
    image_labels: dict[str, list[int]]  # scene / texture -> label numbers
    files: dict[str, list[str]]  # pixel category -> mask file names under images/

    def present(self, category: str) -> bool:
        return bool(self.masks.get(category) or self.image_labels.get(category))


@dataclass(frozen=True)
class TinyBroden:
    """The written dataset: its root and the ground truth."""

    root: Path
    images: list[TinyImage]
    label_names: dict[int, str]
    counts: dict[int, dict[str, int]] = field(repr=False)  # label -> category -> images carrying it
    coverage: dict[int, dict[str, float]] = field(repr=False)  # label -> category -> whole-image units

    def rows(self, split: str | None = None, categories: Sequence[str] | None = None) -> list[TinyImage]:
        """The rows a reader keeps: this split, with data in at least one selected category."""
        categories = categories or CATEGORY_ORDER
        return [im for im in self.images
                if (split is None or im.split == split) and any(im.present(c) for c in categories)]

    def pixel_labels(self, image: TinyImage, categories: Sequence[str] | None = None) -> np.ndarray:
        """Planes in reader order (color, object, material, then parts) for the selected categories."""
        categories = categories or CATEGORY_ORDER
        planes = [p for c in PIXEL_ORDER if c in categories for p in image.masks[c]]
        mask_size = self.images[0].masks["color"][0].shape
        return np.stack(planes) if planes else np.zeros((0, *mask_size), dtype=np.int64)

    def image_labels(self, image: TinyImage, categories: Sequence[str] | None = None) -> list[int]:
        categories = categories or CATEGORY_ORDER
        return [n for c in ("scene", "texture") if c in categories for n in image.image_labels[c]]

    def primary(self, categories: Sequence[str] | None = None, by: str = "coverage") -> dict[int, str | None]:
        """Label -> selected category with the largest coverage (or count), first in order on ties."""
        categories = [c for c in CATEGORY_ORDER if c in (categories or CATEGORY_ORDER)]
        table = self.coverage if by == "coverage" else self.counts
        result = {}
        for number in self.label_names:
            best = None
            for category in categories:
                if category in table[number] and (best is None or table[number][category] > table[number][best]):
                    best = category
            result[number] = best
        return result


def _shape_mask(kind: str, cy: int, cx: int, r: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    dy, dx = yy - cy, xx - cx
    if kind == "disk":
        return dy**2 + dx**2 <= r**2
    if kind == "square":
        return (abs(dy) <= r) & (abs(dx) <= r)
    if kind == "triangle":
        return (abs(dy) <= r) & (2 * abs(dx) <= dy + r)
    return (abs(dy) <= 2) & (abs(dx) <= 2 * r)  # board


def _draw(i: int, rng: np.random.Generator, sh: int):
    """Masks and scalar labels of image `i` (images 0 and 1 are pinned to cover every label kind)."""
    scene = int(rng.choice(list(SCENES)))
    kinds = [str(k) for k in rng.choice(list(SHAPES), size=int(rng.integers(1, 4)))]
    if i == 0:
        kinds = ["board", "disk"]
    elif i == 1:
        kinds = ["square", *kinds[1:]]
    color = np.full((sh, sh), SCENES[scene][1], dtype=np.int64)
    instance = np.full((sh, sh), -1)
    shapes = []
    for j, kind in enumerate(kinds):
        r = int(rng.integers(3, max(4, sh // 5)))
        cy, cx = (int(v) for v in rng.integers(r + 1, sh - r - 1, size=2))
        region = _shape_mask(kind, cy, cx, r, sh)
        instance[region] = j
        color[region] = int(rng.choice([1, 4, 5]))
        shapes.append((kind, cy, cx))
    objects = np.zeros((sh, sh), dtype=np.int64)
    material = np.zeros((sh, sh), dtype=np.int64)
    halves = [np.zeros((sh, sh), dtype=np.int64), np.zeros((sh, sh), dtype=np.int64)]
    yy, xx = np.mgrid[:sh, :sh]
    for j, (kind, cy, cx) in enumerate(shapes):
        visible = instance == j
        objects[visible] = SHAPES[kind]
        material[visible] = MATERIAL_OF[kind]
        if kind != "board":
            halves[0][visible] = np.where(yy < cy, 40, 41)[visible]
            halves[1][visible] = np.where(xx < cx, 42, 513)[visible]
    parts = [] if not halves[0].any() else halves if i % 3 == 0 else halves[:1]
    textures = [[], [60], [61], [60, 62]][i % 4]
    masks = {"color": [color], "object": [objects], "material": [material] if i % 2 == 0 else [], "part": parts}
    return masks, {"scene": [scene], "texture": textures}


def _encode(labels: np.ndarray) -> np.ndarray:
    return np.stack([labels % 256, labels // 256, np.full_like(labels, BLUE_JUNK)], axis=-1).astype(np.uint8)


def _write_csv(path: Path, header: Sequence[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)


def write_tiny_broden(
    root: str | Path, *, n_images: int = 24, image_size: int = 64, seed: int = 0,
    columns: Sequence[str] | None = None,
) -> TinyBroden:
    """Write the dataset under `root` (created); `columns` reorders index.csv's header."""
    if n_images < 2 or image_size % 2:
        raise ValueError("write_tiny_broden needs n_images >= 2 and an even image_size")
    columns = list(columns or INDEX_HEADER)
    assert sorted(columns) == sorted(INDEX_HEADER), "columns must be a permutation of the Broden header"
    root = Path(root)
    (root / "images" / "tiny").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sh = image_size // 2
    images, index_rows = [], []
    counts: dict[int, dict[str, int]] = {n: {} for n in LABEL_NAMES}
    coverage: dict[int, dict[str, float]] = {n: {} for n in LABEL_NAMES}
    for i in range(n_images):
        masks, scalars = _draw(i, rng, sh)
        stem = f"tiny/img_{i:03d}"
        palette = np.array([COLORS.get(n, ("", (0, 0, 0)))[1] for n in range(7)], dtype=np.uint8)
        pixels = palette[masks["color"][0]].repeat(2, axis=0).repeat(2, axis=1)
        Image.fromarray(pixels).save(root / "images" / f"{stem}.png")
        files = {}
        for category, planes in masks.items():
            files[category] = [f"{stem}_{category}.png" if len(planes) == 1 and category != "part"
                               else f"{stem}_{category}_{k + 1}.png" for k in range(len(planes))]
            for name, plane in zip(files[category], planes):
                Image.fromarray(_encode(plane)).save(root / "images" / name)
            stack = np.stack(planes) if planes else np.zeros((0, sh, sh), dtype=np.int64)
            for number in np.unique(stack[stack > 0]).tolist():
                counts[number][category] = counts[number].get(category, 0) + 1
                share = float((stack == number).any(axis=0).mean())
                coverage[number][category] = coverage[number].get(category, 0.0) + share
        for category, numbers in scalars.items():
            for number in numbers:
                counts[number][category] = counts[number].get(category, 0) + 1
                coverage[number][category] = coverage[number].get(category, 0.0) + 1.0
        split = "val" if i % 3 == 2 else "train"
        row = {"image": f"{stem}.png", "split": split, "ih": image_size, "iw": image_size, "sh": sh, "sw": sh,
               **{c: ";".join(f) for c, f in files.items()},
               **{c: ";".join(str(n) for n in v) for c, v in scalars.items()}}
        index_rows.append(row)
        images.append(TinyImage(f"{stem}.png", split, i + 2, pixels, masks, scalars, files))
    _write_csv(root / "index.csv", columns, index_rows)
    coverage = {n: {c: round(v, 6) for c, v in per.items()} for n, per in coverage.items()}  # as written
    _write_metadata(root, images, counts, coverage)
    return TinyBroden(root, images, dict(LABEL_NAMES), counts, coverage)


def _write_metadata(root: Path, images: list[TinyImage], counts: dict, coverage: dict) -> None:
    """label.csv, category.csv and c_<category>.csv from the per-category statistics."""
    label_rows = []
    for number in sorted(LABEL_NAMES):
        cats = [c for c in CATEGORY_ORDER if c in counts[number]]
        label_rows.append({
            "number": number, "name": LABEL_NAMES[number],
            "category": ";".join(f"{c}({counts[number][c]})" for c in cats),
            "frequency": sum(1 for im in images if any(_carries(im, c, number) for c in CATEGORY_ORDER)),
            "coverage": f"{sum(coverage[number].values()):.6f}", "syns": "",
        })
    _write_csv(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"], label_rows)
    category_rows = []
    for category in CATEGORY_ORDER:
        members = [n for n in sorted(LABEL_NAMES) if category in counts[n]]
        category_rows.append({"name": category, "first": min(members, default=0),
                              "last": max(members, default=0), "count": len(members),
                              "frequency": sum(im.present(category) for im in images)})
        rows = [{"code": 0, "number": 0, "name": "-", "frequency": 0, "coverage": 0.0}]
        rows += [{"code": code, "number": n, "name": LABEL_NAMES[n], "frequency": counts[n][category],
                  "coverage": f"{coverage[n][category]:.6f}"} for code, n in enumerate(members, start=1)]
        _write_csv(root / f"c_{category}.csv", ["code", "number", "name", "frequency", "coverage"], rows)
    _write_csv(root / "category.csv", ["name", "first", "last", "count", "frequency"], category_rows)


def _carries(image: TinyImage, category: str, number: int) -> bool:
    if category in image.masks:
        return any((plane == number).any() for plane in image.masks[category])
    return number in image.image_labels.get(category, [])
