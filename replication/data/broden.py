"""The Broden reader: real `broden1_224` / `broden1_227` folders and ConceptWorld alike.

Layout (spec `network_dissection_and_broden.md`, section 3.2), all paths relative to `root`:

- `index.csv`: one row per image, read by column name (order does not matter):
  `image,split,ih,iw,sh,sw` plus one column per category. Pixel categories (color, object, material,
  part) hold mask PNG names under `images/`, several joined by `;` (part: up to four planes);
  image categories (scene, texture) hold global label numbers joined by `;`. Empty cell = absent.
- masks: label = R + 256·G of each pixel (B unused), a global label number; 0 = unlabelled.
- `label.csv` (`number,name,category,frequency,coverage,syns`; `category` like
  `material(36);object(3)`), `category.csv` (`name,...`, order = category order),
  `c_<category>.csv` (`code,number,name,frequency,coverage`, the per-category recoding).

Primary category of a label (NetDissect-Lite's rule, spec 2.2): among the *selected* categories the
label belongs to, the one where its coverage (from `c_<category>.csv`) is largest; ties go to the
category listed first in `category.csv`. `primary_by="count"` uses the image counts of `label.csv`'s
`category` column instead (no `c_*.csv` needed). Labels in no selected category get none (-1).

Like NetDissect-Lite, rows with no data in any selected category are dropped (`drop_unlabelled`);
for the category-restricted IoU such images contribute nothing.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from replication import paths
from replication.runtime import progress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# NetDissect-Lite's normalisation (spec 2.2): RGB mean of its BGR constants, one std for all channels.
NETDISSECT_LITE_MEAN = (124.6901 / 255, 118.6897 / 255, 109.5388 / 255)
NETDISSECT_LITE_STD = (0.224, 0.224, 0.224)

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
PIXEL_CATEGORIES = ("color", "object", "material", "part")  # the order of planes in `pixel_labels`
IMAGE_CATEGORIES = ("scene", "texture")
SPLITS = ("train", "val")
PRIMARY_RULES = ("coverage", "count")
INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
LABEL_COLUMNS = ("number", "name", "category", "coverage")


def cached_world(root: str | Path) -> Path | None:
    """The cached ConceptWorld folder (`<data dir>/concept_world/<hash>/`) holding `root`, or None."""
    cache, where = paths.data_dir().resolve() / "concept_world", Path(root).resolve()
    return cache / where.relative_to(cache).parts[0] if where.is_relative_to(cache) and where != cache else None


def world_fix(root: str | Path) -> str:
    """How to rebuild the ConceptWorld at `root`: a cached one is deleted (the next run regenerates
    it), an existing folder is regenerated with the profile that made it, a new one generated."""
    root = Path(root)
    cached = cached_world(root)
    if cached is not None:
        return f"delete {cached} (a cached ConceptWorld); the next run regenerates it"
    if root.is_dir() and any(root.iterdir()):
        return (f"regenerate it with the profile that made it: "
                f"`python -m replication world --profile <that profile> --out {root} --overwrite`")
    return f"generate ConceptWorld with `python -m replication world --profile default --out {root}`"


def _where_from(root: Path) -> str:
    """The fix for a missing or incomplete dataset folder."""
    if cached_world(root) is not None:
        return world_fix(root)
    return (
        f"{world_fix(root)}, or unpack broden1_224.zip / broden1_227.zip so that {root} holds index.csv, "
        "label.csv, category.csv, c_*.csv and images/"
    )


_CATEGORY_COUNT = re.compile(r"^\s*(\w+)\((\d+)\)\s*$")


class BrodenFormatError(ValueError):
    """A Broden file is malformed or inconsistent; the message names the file (and line) and the fix."""


def encode_label_mask(labels: np.ndarray) -> np.ndarray:
    """Global label numbers (H×W, 0 ≤ n < 65536) → H×W×3 uint8 with R + 256·G = n, B = 0."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= 1 << 16):
        raise ValueError("label numbers must lie in [0, 65535] to fit R + 256·G; renumber the labels.")
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = labels >> 8
    return rgb


def decode_label_mask(rgb: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 → int32 label numbers R + 256·G (widened first: uint8 arithmetic would overflow)."""
    rgb = np.asarray(rgb)
    return rgb[..., 0].astype(np.int32) | (rgb[..., 1].astype(np.int32) << 8)


def _read_table(path: Path, required: Sequence[str], hint: str) -> tuple[bytes, list[tuple[int, dict]]]:
    """Raw bytes (for the fingerprint) and `(line, row)` pairs of a CSV read by column name."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {hint}.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BrodenFormatError(f"{path} is not UTF-8 text ({err.reason}); {hint}.") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [column for column in required if column not in header]
    if missing:
        raise BrodenFormatError(
            f"{path} line 1: header lacks column(s) {', '.join(missing)} (has {', '.join(header) or 'nothing'}); {hint}."
        )
    rows = []
    for row in reader:
        if None in row or None in row.values():  # DictReader's marks for extra / missing fields
            raise BrodenFormatError(
                f"{path} line {reader.line_num}: the number of fields differs from the header's {len(header)}; {hint}."
            )
        rows.append((reader.line_num, {key: value.strip() for key, value in row.items()}))
    return raw, rows


def _parse_int(text: str, path: Path, line: int, column: str, hint: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise BrodenFormatError(f"{path} line {line}: {column} = {text!r} is not an integer; {hint}.") from None


def _parse_coverage_cell(row: dict, path: Path, line: int, hint: str) -> float:
    """The `coverage` cell as a float; empty = 0."""
    try:
        return float(row["coverage"]) if row["coverage"] else 0.0
    except ValueError:
        raise BrodenFormatError(f"{path} line {line}: coverage {row['coverage']!r} is not a number; {hint}.") from None


def _split_cell(cell: str) -> list[str]:
    return [part.strip() for part in cell.split(";") if part.strip()]


class BrodenDataset(Dataset):
    """Images, per-category label masks and image-level labels of a Broden-format folder.

    `split`: None (all), "train" or "val". `categories`: subset of the categories in `category.csv`
    (None = all); their order is always that of `category.csv`. `image_size`: int or (h, w) to resize
    images to (bilinear); None keeps `ih`×`iw` (which must then be uniform). Images are normalised
    with `mean`/`std`, then passed through `transform` (which must not move pixels: masks are not
    transformed). `primary_by`: "coverage" (NetDissect-Lite, `c_<category>.csv`) or "count"
    (`label.csv`); see the module docstring. `drop_unlabelled`: drop rows with no data in any selected
    category. A sample's `category_present[c]` is true when the image has a non-zero pixel in a mask of
    category c, or an image-level label of c. Mask labels are checked against `label.csv` whenever a
    sample is loaded; `validate()` checks every file once. `labels.category` is missing (NaN) for
    labels of no selected category, and their `primary_category` is -1.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str | None = None,
        categories: Sequence[str] | None = None,
        image_size: int | tuple[int, int] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        primary_by: str = "coverage",
        drop_unlabelled: bool = True,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Broden directory {root} does not exist; {_where_from(root)}.")
        if split not in (None, *SPLITS):
            raise ValueError(f"unknown split {split!r}; use None (all images), 'train' or 'val'.")
        if primary_by not in PRIMARY_RULES:
            raise ValueError(f"unknown primary_by {primary_by!r}; use 'coverage' (NetDissect-Lite) or 'count'.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need three values each, std positive; got mean={mean}, std={std}.")
        hint = f"{root} is not a valid Broden directory: {_where_from(root)}"
        digest = hashlib.sha256()

        raw, category_rows = _read_table(root / "category.csv", ["name"], hint)
        digest.update(b"category.csv\0" + raw)
        available = [row["name"] for _, row in category_rows]
        self.categories = self._select_categories(root, available, categories)
        self.pixel_categories = [c for c in PIXEL_CATEGORIES if c in self.categories]
        self.image_categories = [c for c in IMAGE_CATEGORIES if c in self.categories]

        raw, label_rows = _read_table(root / "label.csv", LABEL_COLUMNS, hint)
        digest.update(b"label.csv\0" + raw)
        self.labels, counts = self._parse_labels(root / "label.csv", label_rows, hint)
        self.num_labels = int(self.labels.index.max()) + 1 if len(self.labels) else 1
        self.label_names = [""] * self.num_labels
        for number, name in self.labels["name"].items():
            self.label_names[number] = name
        self._known = np.zeros(self.num_labels, dtype=bool)
        self._known[self.labels.index.tolist()] = True
        self._known[0] = True

        if primary_by == "count":
            scores = {c: counts.get(c, {}) for c in self.categories}
        else:
            scores = {}
            for category in self.categories:
                path = root / f"c_{category}.csv"
                raw, rows = _read_table(path, ["number", "coverage"], f"{hint}; or pass primary_by='count'")
                digest.update(path.name.encode() + b"\0" + raw)
                scores[category] = self._parse_coverage(path, rows, hint)
        self.primary_category = self._primary(scores)
        self.labels["category"] = [
            self.categories[c] if c >= 0 else None for c in self.primary_category[self.labels.index.tolist()].tolist()
        ]

        raw, index_rows = _read_table(root / "index.csv", [*INDEX_COLUMNS, *self.categories], hint)
        digest.update(b"index.csv\0" + raw)
        self._parse_index(root / "index.csv", index_rows, split, drop_unlabelled, hint)
        self.root = root
        self.split = split
        self.image_size = self._resolve_image_size(root, image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._scale = 1 / (255 * torch.tensor(self.std).view(3, 1, 1))
        self._offset = torch.tensor(self.mean).view(3, 1, 1) / torch.tensor(self.std).view(3, 1, 1)
        self.transform = transform
        self.primary_by = primary_by
        settings = dict(split=split, categories=self.categories, image_size=self.image_size, mean=self.mean,
                        std=self.std, primary_by=primary_by, drop_unlabelled=drop_unlabelled)
        digest.update(json.dumps(settings, sort_keys=True).encode())
        if (root / "world.json").is_file():  # a ConceptWorld: its generator and config identify the pixels
            digest.update((root / "world.json").read_bytes())
        self._fingerprint = digest.hexdigest()[:16]

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _select_categories(root: Path, available: list[str], requested: Sequence[str] | None) -> list[str]:
        if requested is None:
            unsupported = [c for c in available if c not in CATEGORIES]
            if unsupported:
                raise BrodenFormatError(
                    f"{root / 'category.csv'} lists {', '.join(unsupported)}, which this reader does not support "
                    f"(known: {', '.join(CATEGORIES)}); pass categories=[...] naming supported ones."
                )
            chosen = available
        else:
            requested = [requested] if isinstance(requested, str) else list(requested)
            for name in requested:
                if name not in available:
                    raise ValueError(
                        f"unknown category {name!r}; {root / 'category.csv'} has {', '.join(available)}."
                    )
                if name not in CATEGORIES:
                    raise ValueError(f"category {name!r} is not supported by this reader; choose from {', '.join(CATEGORIES)}.")
            chosen = [c for c in available if c in requested]
        if not chosen:
            raise ValueError(f"no categories selected; choose from {', '.join(available) or '(none in category.csv)'}.")
        return chosen

    @staticmethod
    def _parse_labels(path: Path, rows: list[tuple[int, dict]], hint: str) -> tuple[pd.DataFrame, dict]:
        """The label table (number > 0) and `counts[category][number]` from the `category` column."""
        numbers, names, coverages, counts = [], [], [], {}
        seen = set()
        for line, row in rows:
            number = _parse_int(row["number"], path, line, "number", hint)
            if number < 0 or number >= 1 << 16 or number in seen:
                raise BrodenFormatError(f"{path} line {line}: label number {number} is negative, ≥ 65536 or repeated; {hint}.")
            seen.add(number)
            for entry in _split_cell(row["category"]):
                match = _CATEGORY_COUNT.match(entry)
                if not match:
                    raise BrodenFormatError(
                        f"{path} line {line}: category entry {entry!r} is not like 'object(12)'; {hint}."
                    )
                counts.setdefault(match.group(1), {})[number] = int(match.group(2))
            if number == 0:  # 0 means unlabelled, whatever the file calls it
                continue
            numbers.append(number)
            names.append(row["name"])
            coverages.append(_parse_coverage_cell(row, path, line, hint))
        labels = pd.DataFrame(
            {"name": names, "category": [None] * len(numbers), "coverage": coverages},
            index=pd.Index(numbers, name="number", dtype=np.int64),
        ).sort_index()
        return labels, counts

    def _parse_coverage(self, path: Path, rows: list[tuple[int, dict]], hint: str) -> dict[int, float]:
        coverage = {}
        for line, row in rows:
            number = _parse_int(row["number"], path, line, "number", hint)
            if number == 0:
                continue
            if not (0 < number < self.num_labels and self._known[number]):
                raise BrodenFormatError(f"{path} line {line}: label number {number} is not in label.csv; {hint}.")
            coverage[number] = _parse_coverage_cell(row, path, line, hint)
        return coverage

    def _primary(self, scores: dict[str, dict[int, float]]) -> torch.Tensor:
        """Per label, the selected category with the largest score (first listed on ties), -1 if none."""
        table = np.full((self.num_labels, len(self.categories)), -np.inf)
        for column, category in enumerate(self.categories):
            for number, score in scores[category].items():
                if 0 < number < self.num_labels:
                    table[number, column] = score
        primary = np.where(np.isfinite(table).any(axis=1), table.argmax(axis=1), -1)
        return torch.from_numpy(primary.astype(np.int64))

    def _parse_index(self, path: Path, rows: list[tuple[int, dict]], split: str | None, drop_unlabelled: bool, hint: str):
        """Keep the rows of `split`; per row, the image, its mask files and its image-level labels."""
        position = {c: i for i, c in enumerate(self.categories)}
        kept, self._images, self._masks, self._image_labels, self._lines = [], [], [], [], []
        for line, row in rows:
            if row["split"] not in SPLITS:
                raise BrodenFormatError(f"{path} line {line}: split {row['split']!r} is neither 'train' nor 'val'; {hint}.")
            if not row["image"]:
                raise BrodenFormatError(f"{path} line {line}: the image cell is empty; {hint}.")
            for column in ("ih", "iw", "sh", "sw"):
                if _parse_int(row[column], path, line, column, hint) <= 0:
                    raise BrodenFormatError(f"{path} line {line}: {column} = {row[column]} is not positive; {hint}.")
            image_labels = []
            for category in self.image_categories:
                for cell in _split_cell(row[category]):
                    number = _parse_int(cell, path, line, category, hint)
                    if not (0 < number < self.num_labels and self._known[number]):
                        raise BrodenFormatError(
                            f"{path} line {line}: {category} label {number} is not in label.csv; {hint}."
                        )
                    image_labels.append((position[category], number))
            masks = [(position[c], name) for c in self.pixel_categories for name in _split_cell(row[c])]
            if split is not None and row["split"] != split:
                continue
            if drop_unlabelled and not masks and not image_labels:
                continue
            kept.append(row)
            self._images.append(row["image"])
            self._masks.append(tuple(masks))
            self._image_labels.append(tuple(image_labels))
            self._lines.append(line)
        if not kept:
            raise BrodenFormatError(
                f"{path}: no image of split={split!r} has data in categories {', '.join(self.categories)}; "
                "choose another split or categories."
            )
        self.index = pd.DataFrame(kept)
        for column in ("ih", "iw", "sh", "sw"):
            self.index[column] = self.index[column].astype(np.int64)
        self.index.insert(0, "line", self._lines)
        sizes = self.index[["sh", "sw"]].drop_duplicates()
        if len(sizes) > 1:
            line = int(self.index.loc[sizes.index[1], "line"])
            raise BrodenFormatError(
                f"{path} line {line}: mask size {tuple(sizes.iloc[1].tolist())} differs from "
                f"{tuple(sizes.iloc[0].tolist())} on earlier rows; this reader needs one mask size, so fix or drop the row."
            )
        self.mask_size = tuple(sizes.iloc[0].tolist())

    def _resolve_image_size(self, root: Path, image_size) -> tuple[int, int]:
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if len(size) != 2 or min(size) <= 0:
                raise ValueError(f"image_size must be a positive int or (height, width); got {image_size!r}.")
            return (int(size[0]), int(size[1]))
        sizes = self.index[["ih", "iw"]].drop_duplicates()
        if len(sizes) > 1:
            raise ValueError(
                f"images in {root / 'index.csv'} have several sizes ({len(sizes)} distinct ih×iw); pass image_size=."
            )
        return tuple(sizes.iloc[0].tolist())

    # ---------------------------------------------------------------- samples
    @property
    def fingerprint(self) -> str:
        """Stable hash of the CSV files read plus the reader's settings, for cache keys."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self._images)

    def _where(self, i: int) -> str:
        return f"(index.csv line {self._lines[i]})"

    def _open(self, i: int, name: str, what: str) -> Image.Image:
        """Open `images/<name>` of row `i` (header only until used); missing or unreadable → clear error."""
        path = self.root / "images" / name
        try:
            return Image.open(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{what} {path} {self._where(i)} is missing; {_where_from(self.root)}."
            ) from None
        except OSError as err:
            raise BrodenFormatError(f"{what} {path} {self._where(i)} cannot be read ({err}); replace the file.") from None

    def load_image(self, i: int) -> torch.Tensor:
        """Image `i` as a normalised float tensor 3×H×W (before `transform`)."""
        with self._open(i, self._images[i], "image") as opened:
            image = opened.convert("RGB")
        height, width = self.image_size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float()
        return pixels.mul_(self._scale).sub_(self._offset)  # (x / 255 - mean) / std, contiguous: 6× faster

    def load_mask(self, i: int, name: str) -> np.ndarray:
        """One mask file of row `i` as int32 global label numbers sh×sw, checked against label.csv."""
        with self._open(i, name, "mask file") as opened:
            labels = decode_label_mask(np.asarray(opened.convert("RGB")))
        path = self.root / "images" / name
        if labels.shape != self.mask_size:
            raise BrodenFormatError(
                f"mask file {path} {self._where(i)} is {labels.shape[0]}×{labels.shape[1]}, not sh×sw = "
                f"{self.mask_size[0]}×{self.mask_size[1]}; regenerate the mask or fix index.csv."
            )
        if labels.max() >= self.num_labels or not self._known[labels].all():
            inside = np.minimum(labels, self.num_labels - 1)
            unknown = np.unique(labels[(labels >= self.num_labels) | ~self._known[inside]]).tolist()
            listed = ", ".join(str(v) for v in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise BrodenFormatError(
                f"mask file {path} {self._where(i)} has label(s) {listed} not in label.csv; "
                "regenerate the mask or add the labels to label.csv."
            )
        return labels

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = i % len(self)
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        present = torch.zeros(len(self.categories), dtype=torch.bool)
        planes = np.zeros((len(self._masks[i]), *self.mask_size), dtype=np.int64)
        for plane, (category, name) in enumerate(self._masks[i]):
            planes[plane] = self.load_mask(i, name)
            if planes[plane].any():
                present[category] = True
        for category, _ in self._image_labels[i]:
            present[category] = True
        return {
            "image": image,
            "pixel_labels": torch.from_numpy(planes),
            "image_labels": torch.tensor([number for _, number in self._image_labels[i]], dtype=torch.int64),
            "category_present": present,
            "index": i,
        }

    def validate(self) -> None:
        """Open every image (header) and decode every mask once; raises the first problem found."""
        for i in progress(range(len(self)), desc="validate Broden", total=len(self)):
            self._open(i, self._images[i], "image").close()
            for _, name in self._masks[i]:
                self.load_mask(i, name)


def collate_broden(items: list[dict]) -> dict:
    """Stack samples; `pixel_labels` (B×P×sh×sw) and `image_labels` (B×L) are padded with 0."""
    planes = max(item["pixel_labels"].shape[0] for item in items)
    scalars = max(item["image_labels"].shape[0] for item in items)
    pixel_labels = torch.zeros((len(items), planes, *items[0]["pixel_labels"].shape[1:]), dtype=torch.int64)
    image_labels = torch.zeros((len(items), scalars), dtype=torch.int64)
    for b, item in enumerate(items):
        pixel_labels[b, : item["pixel_labels"].shape[0]] = item["pixel_labels"]
        image_labels[b, : item["image_labels"].shape[0]] = item["image_labels"]
    return {
        "image": torch.stack([item["image"] for item in items]),
        "pixel_labels": pixel_labels,
        "image_labels": image_labels,
        "category_present": torch.stack([item["category_present"] for item in items]),
        "index": torch.tensor([item["index"] for item in items], dtype=torch.int64),
    }


def broden_loader(
    dataset: BrodenDataset, *, batch_size: int, num_workers: int = 0, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """Batches of `collate_broden` dicts; `seed` fixes the order when `shuffle` is on."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_broden,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        persistent_workers=False,
    )
