"""ConceptWorld: a deterministic generator of images with exact concept annotations in Broden's format.

Two presets (`WorldConfig.preset`):

- `"classification"`: scenes (street, room, park, harbour, field) with 10 object types drawn from
  named parts, painted in 11 named colours, patterns and scikit-image's texture photographs; parts map
  to materials. Ten classes, each a rule "scene + object whose part has a colour or material"
  (two per scene), grouped as urban / nature; every image also holds distractor objects, so no
  single cue decides the class.
- `"cgl_shapes"`: CGL's synthetic task (spec 03, section 5): two non-overlapping shapes from
  {square, circle, triangle}, each red, green or blue; label "a square is present" (`cgl_task =
  "binary"`) or the unordered pair of colour-shapes (`"combination"`, 45 classes). Its 15 concepts
  are stored as color (3 colours), object (3 shapes) and part (9 colour-shapes, each a part of its
  shape, so a shape's mask is the union of its colour-shape masks).

On disk (`generate_world`): `index.csv`, `label.csv`, `category.csv`, `c_<category>.csv` and
`images/` exactly as Broden (spec `network_dissection_and_broden.md` section 3.2; images are PNG so
colour masks are exact; masks are R + 256·G label PNGs at `mask_size`), plus `tasks.csv`,
`classes.json`, `concept_tree.json`, `instances.csv` (visible box of every object and part
instance, for concept image sets), `evidence/` (per image, 255 on the pixels of the objects that
make its class) and `world.json`.

Annotation rules:
- Label numbers are assigned in blocks of 100 per category (color 1.., object 101.., part 201..,
  material 301.., scene 401.., texture 501..), so the numbering of one category never shifts when
  another grows; the numbers between blocks are unused. Material numbers above 255 exercise the G
  channel of the mask encoding. "brick" is both a material (brick-photo walls) and a texture (an
  image whose brick-painted area passes `texture_min_fraction`), the label in two categories.
- Mask pixel (i, j) carries the labels of the image pixel under its centre,
  (floor((i + ½)·ih/sh), floor((j + ½)·iw/sw)) (nearest down-sampling of the painted records), so
  every labelled colour-mask pixel has exactly a shade of that colour in the image there.
- Part plane 1 holds object parts, plane 2 sub-parts (wheel → tire, hub; head → face, hair).
  An object's mask is the union of its parts; a material's mask the union of the parts painted
  in it. Backgrounds carry no object, part or material label.
- Texture labels of an image: the textures painted on at least `texture_min_fraction` of its
  pixels, largest first. Scene: one label per image.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io as _io
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from replication import cache, io, paths
from replication.data.broden import CATEGORIES, encode_label_mask
from replication.data.drawing import (
    COLOUR_INDEX,
    COLOUR_NAMES,
    PALETTE,
    PHOTOS,
    TEXTURE_NAMES,
    Canvas,
    Fill,
    box_window,
    both,
    circle,
    ellipse,
    encode_png,
    photo_tile,
    poly,
    rect,
    shape_mask,
)
from replication.runtime import progress

GENERATOR_VERSION = 1  # part of every cache key, with a hash of the generator's source (see generator_identity)
PRESETS = ("classification", "cgl_shapes")
CGL_TASKS = ("binary", "combination")
LABEL_BLOCK = 100
INDEX_HEADER = ("image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture")
TASK_HEADER = ("image", "split", "class_id", "class_name", "superclass")
INSTANCE_HEADER = ("image", "split", "category", "concept", "label", "object", "role",
                   "top", "left", "bottom", "right", "pixels")
PNG_COMPRESS_LEVEL = 1  # zlib level: lossless either way, level 1 is the fastest that still compresses


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a ConceptWorld; the field names are the keys of the [world]/[cgl_world] profiles.

    `mask_size` None means image_size // 2 (Broden's rule). `distractors`: (min, max) distractor
    objects per image; `object_area`: (min, max) bounding-box area of an object as a fraction of the
    image (sets concept coverage, hence the IoU ceilings, see `iou_ceiling`); `confuser_rate`: chance
    that a distractor has the type of a class-rule object of its scene (with other attributes), so
    that object type alone does not decide the class; `texture_min_fraction`:
    share of an image a texture must cover to become one of its texture labels; `cgl_task`: "binary"
    or "combination"; `cgl_shape_size`: (min, max) shape side as a fraction of the image side.
    """

    preset: str = "classification"
    n_images: int = 1000
    image_size: int = 64
    mask_size: int | None = None
    seed: int = 0
    val_fraction: float = 0.3
    distractors: tuple[int, int] = (1, 2)
    confuser_rate: float = 0.35
    object_area: tuple[float, float] = (0.035, 0.055)
    texture_min_fraction: float = 0.1
    cgl_task: str = "binary"
    cgl_shape_size: tuple[float, float] = (0.18, 0.26)

    def __post_init__(self):
        if self.mask_size is None:
            object.__setattr__(self, "mask_size", self.image_size // 2)
        for name in ("distractors", "object_area", "cgl_shape_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if self.preset not in PRESETS:
            problems.append(f"preset {self.preset!r} is not one of {PRESETS}")
        if self.n_images < 1:
            problems.append(f"n_images = {self.n_images} must be at least 1")
        if self.image_size < 16:
            problems.append(f"image_size = {self.image_size} must be at least 16")
        if not 1 <= self.mask_size <= self.image_size:
            problems.append(f"mask_size = {self.mask_size} must lie in [1, image_size]")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction = {self.val_fraction} must lie in [0, 1)")
        if len(self.distractors) != 2 or not 0 <= self.distractors[0] <= self.distractors[1]:
            problems.append(f"distractors = {self.distractors} must be (min, max) with 0 <= min <= max")
        if len(self.object_area) != 2 or not 0 < self.object_area[0] <= self.object_area[1] <= 0.5:
            problems.append(f"object_area = {self.object_area} must be (min, max) within (0, 0.5]")
        if not 0 <= self.confuser_rate <= 1:
            problems.append(f"confuser_rate = {self.confuser_rate} must lie in [0, 1]")
        if not 0 < self.texture_min_fraction <= 1:
            problems.append(f"texture_min_fraction = {self.texture_min_fraction} must lie in (0, 1]")
        if self.cgl_task not in CGL_TASKS:
            problems.append(f"cgl_task {self.cgl_task!r} is not one of {CGL_TASKS}")
        if len(self.cgl_shape_size) != 2 or not 0 < self.cgl_shape_size[0] <= self.cgl_shape_size[1] <= 0.45:
            problems.append(f"cgl_shape_size = {self.cgl_shape_size} must be (min, max) within (0, 0.45]")
        if problems:
            raise ValueError("invalid WorldConfig: " + "; ".join(problems) + ".")


# ============================================================================ the catalogue
@dataclass(frozen=True)
class Piece:
    """One drawn shape of an object: its part, optional sub-part and style (default: sub-part or part)."""

    part: str
    shape: tuple
    subpart: str | None = None
    style: str | None = None

    @property
    def style_name(self) -> str:
        return self.style or self.subpart or self.part


@dataclass(frozen=True)
class ObjectType:
    name: str
    group: str  # its parent in the concept tree
    aspect: float  # bounding-box width / height
    placement: str  # "ground": stands below the horizon; "any": anywhere (birds)
    pieces: tuple[Piece, ...]


@dataclass(frozen=True)
class Style:
    """Allowed finishes ((kind, material) pairs), colour names and shades for a part or background."""

    finishes: tuple[tuple[str, str | None], ...]
    colours: tuple[str, ...]
    shades: tuple[int, ...] = (0, 1)


_P, _S, _D, _C, _N, _W = "plain", "stripes", "dots", "checker", "noise", "wood"
STYLES: dict[str, Style] = {
    # object parts
    "wall": Style(((_P, None), (_S, None), ("photo:brick", "brick"), (_W, "wood")),
                  ("white", "yellow", "pink", "gray", "orange", "red", "blue", "green", "purple")),
    "roof": Style(((_P, None), (_C, None)), ("red", "brown", "gray", "black", "blue", "green")),
    "door": Style(((_W, "wood"), (_P, "wood")), ("brown", "red", "green", "blue", "black")),
    "window": Style(((_P, "glass"),), ("blue", "white")),
    "trunk": Style(((_P, "wood"), (_W, "wood")), ("brown",)),
    "crown": Style(((_P, "foliage"), (_D, "foliage"), (_N, "foliage")), ("green", "orange", "yellow", "red")),
    "car_body": Style(((_P, "metal"),), ("red", "blue", "white", "black", "gray", "yellow", "green", "purple")),
    "tire": Style(((_P, "rubber"),), ("black",), (0,)),
    "hub": Style(((_P, "metal"),), ("gray", "white")),
    "hull": Style(((_P, "wood"), (_W, "wood"), (_P, "metal")), ("red", "white", "blue", "brown", "black", "yellow")),
    "sail": Style(((_P, "fabric"), (_S, "fabric")), ("white", "red", "yellow", "blue", "orange", "purple")),
    "stem": Style(((_P, "foliage"),), ("green",)),
    "petal": Style(((_P, None), (_D, None)), ("red", "yellow", "pink", "purple", "white", "orange", "blue")),
    "face": Style(((_P, "skin"),), ("pink", "orange", "brown"), (1,)),
    "hair": Style(((_P, None),), ("black", "brown", "yellow")),
    "torso": Style(((_P, "fabric"), (_S, "fabric"), (_C, "fabric"), (_D, "fabric")),
                   ("red", "blue", "green", "yellow", "white", "purple", "orange", "black")),
    "person_leg": Style(((_P, "fabric"),), ("blue", "black", "gray", "brown")),
    "pole": Style(((_P, "metal"),), ("gray", "black")),
    "shade": Style(((_P, "fabric"), (_P, "glass")), ("yellow", "white", "red", "green", "orange", "purple")),
    "frame": Style(((_P, "metal"),), ("red", "blue", "black", "green", "yellow")),
    "bird_body": Style(((_P, None), (_N, None)), ("brown", "black", "white", "blue", "yellow", "red")),
    "wing": Style(((_P, None), (_S, None)), ("brown", "black", "white", "blue", "gray")),
    "seat": Style(((_W, "wood"), (_P, "metal")), ("brown", "green", "red")),
    "bench_leg": Style(((_P, "metal"),), ("black", "gray")),
    # backgrounds (no object, part or material label)
    "sky": Style(((_P, None),), ("blue", "white"), (1,)),
    "road": Style((("photo:gravel", None), (_P, None), (_N, None)), ("gray", "black")),
    "room_wall": Style(((_P, None), (_S, None), (_D, None), (_C, None), ("photo:brick", None)),
                       ("white", "yellow", "pink", "blue", "green", "orange"), (1,)),
    "room_floor": Style(((_W, None), (_C, None), (_P, None)), ("brown", "black", "white", "gray")),
    "lawn": Style((("photo:grass", None), (_P, None), (_N, None)), ("green",)),
    "water": Style(((_S, None), (_P, None), (_N, None)), ("blue",)),
    "farmland": Style(((_S, None), ("photo:gravel", None), (_D, None)), ("yellow", "brown", "orange", "green")),
}

OBJECTS: tuple[ObjectType, ...] = (
    ObjectType("house", "structure", 1.0, "ground", (
        Piece("wall", rect(0.08, 0.45, 0.92, 1.0)),
        Piece("roof", poly((0.0, 0.48), (0.5, 0.0), (1.0, 0.48))),
        Piece("door", rect(0.4, 0.6, 0.64, 1.0)),
        Piece("window", rect(0.12, 0.55, 0.34, 0.8)),
        Piece("window", rect(0.7, 0.55, 0.9, 0.8)),
    )),
    ObjectType("lamp", "structure", 0.5, "ground", (
        Piece("pole", rect(0.36, 0.35, 0.64, 1.0)),
        Piece("pole", rect(0.1, 0.9, 0.9, 1.0)),
        Piece("shade", poly((0.0, 0.42), (1.0, 0.42), (0.78, 0.0), (0.22, 0.0))),
    )),
    ObjectType("car", "vehicle", 1.8, "ground", (
        Piece("body", poly((0.18, 0.42), (0.28, 0.04), (0.76, 0.04), (0.88, 0.42)), style="car_body"),
        Piece("body", rect(0.0, 0.4, 1.0, 0.8), style="car_body"),
        Piece("window", rect(0.31, 0.11, 0.5, 0.4)),
        Piece("window", rect(0.54, 0.11, 0.74, 0.4)),
        Piece("wheel", circle(0.24, 0.76, 0.24), subpart="tire"),
        Piece("wheel", circle(0.76, 0.76, 0.24), subpart="tire"),
        Piece("wheel", circle(0.24, 0.76, 0.12), subpart="hub"),
        Piece("wheel", circle(0.76, 0.76, 0.12), subpart="hub"),
    )),
    ObjectType("boat", "vehicle", 1.25, "ground", (
        Piece("hull", poly((0.0, 0.62), (1.0, 0.62), (0.82, 1.0), (0.18, 1.0))),
        Piece("sail", poly((0.52, 0.0), (0.52, 0.6), (0.96, 0.6))),
        Piece("sail", poly((0.48, 0.08), (0.48, 0.6), (0.08, 0.6))),
    )),
    ObjectType("bicycle", "vehicle", 1.6, "ground", (
        Piece("wheel", circle(0.22, 0.68, 0.32), subpart="tire"),
        Piece("wheel", circle(0.78, 0.68, 0.32), subpart="tire"),
        Piece("wheel", circle(0.22, 0.68, 0.16), subpart="hub"),
        Piece("wheel", circle(0.78, 0.68, 0.16), subpart="hub"),
        Piece("frame", rect(0.2, 0.4, 0.8, 0.58)),
        Piece("frame", rect(0.4, 0.1, 0.54, 0.68)),
        Piece("frame", rect(0.7, 0.0, 0.84, 0.6)),
        Piece("frame", rect(0.28, 0.0, 0.62, 0.16)),
    )),
    ObjectType("tree", "plant", 0.75, "ground", (
        Piece("trunk", rect(0.32, 0.45, 0.68, 1.0)),
        Piece("crown", ellipse(0.5, 0.33, 0.5, 0.33)),
    )),
    ObjectType("flower", "plant", 0.6, "ground", (
        Piece("stem", rect(0.36, 0.45, 0.64, 1.0)),
        Piece("stem", ellipse(0.72, 0.74, 0.28, 0.12)),
        Piece("petal", circle(0.5, 0.26, 0.26)),
    )),
    ObjectType("person", "animal", 0.45, "ground", (
        Piece("leg", rect(0.16, 0.6, 0.46, 1.0), style="person_leg"),
        Piece("leg", rect(0.54, 0.6, 0.84, 1.0), style="person_leg"),
        Piece("torso", rect(0.06, 0.27, 0.94, 0.62)),
        Piece("head", circle(0.5, 0.14, 0.14), subpart="face"),
        Piece("head", both(circle(0.5, 0.14, 0.14), rect(0.0, 0.0, 1.0, 0.12)), subpart="hair"),
    )),
    ObjectType("bird", "animal", 1.4, "any", (
        Piece("body", ellipse(0.42, 0.6, 0.4, 0.36), style="bird_body"),
        Piece("head", circle(0.78, 0.3, 0.28), style="bird_body"),
        Piece("wing", ellipse(0.4, 0.46, 0.3, 0.22)),
    )),
    ObjectType("bench", "furniture", 1.6, "ground", (
        Piece("leg", rect(0.04, 0.5, 0.22, 1.0), style="bench_leg"),
        Piece("leg", rect(0.78, 0.5, 0.96, 1.0), style="bench_leg"),
        Piece("seat", rect(0.0, 0.38, 1.0, 0.62)),
        Piece("seat", rect(0.0, 0.0, 1.0, 0.24)),
        Piece("seat", rect(0.1, 0.24, 0.22, 0.38)),
        Piece("seat", rect(0.78, 0.24, 0.9, 0.38)),
    )),
)
OBJECT_BY_NAME = {o.name: o for o in OBJECTS}
MATERIALS = ("glass", "wood", "metal", "fabric", "brick", "foliage", "skin", "rubber")


@dataclass(frozen=True)
class Scene:
    name: str
    superclass: str
    upper: str  # background style above the horizon
    lower: str  # below it
    horizon: tuple[float, float]  # (min, max) fraction of the image height
    pool: tuple[str, ...]  # object types that may appear as distractors


SCENES: tuple[Scene, ...] = (
    Scene("street", "urban", "sky", "road", (0.35, 0.5), ("house", "car", "lamp", "person", "bicycle", "tree", "bird")),
    Scene("room", "urban", "room_wall", "room_floor", (0.55, 0.7), ("person", "lamp", "flower", "bench", "bird")),
    Scene("park", "nature", "sky", "lawn", (0.3, 0.45), ("tree", "person", "flower", "bench", "bird", "bicycle", "lamp")),
    Scene("harbour", "nature", "sky", "water", (0.35, 0.5), ("boat", "house", "person", "lamp", "bird")),
    Scene("field", "nature", "sky", "farmland", (0.3, 0.45), ("tree", "flower", "bird", "house", "bicycle")),
)
SCENE_BY_NAME = {s.name: s for s in SCENES}


@dataclass(frozen=True)
class ClassRule:
    """Class = scene AND an object whose `part` is painted `colour` (or made of `material`)."""

    name: str
    scene: str
    object: str
    part: str
    colour: str | None = None
    material: str | None = None

    @property
    def superclass(self) -> str:
        return SCENE_BY_NAME[self.scene].superclass

    def as_dict(self) -> dict:
        rule = {"scene": self.scene, "object": self.object, "part": self.part}
        rule.update({"color": self.colour} if self.colour else {"material": self.material})
        return rule


CLASS_RULES: tuple[ClassRule, ...] = (
    ClassRule("red car in street", "street", "car", "body", colour="red"),
    ClassRule("brick house in street", "street", "house", "wall", material="brick"),
    ClassRule("blue-shirted person in room", "room", "person", "torso", colour="blue"),
    ClassRule("yellow lamp in room", "room", "lamp", "shade", colour="yellow"),
    ClassRule("red-shirted person in park", "park", "person", "torso", colour="red"),
    ClassRule("orange tree in park", "park", "tree", "crown", colour="orange"),
    ClassRule("white-sailed boat in harbour", "harbour", "boat", "sail", colour="white"),
    ClassRule("red-hulled boat in harbour", "harbour", "boat", "hull", colour="red"),
    ClassRule("yellow flower in field", "field", "flower", "petal", colour="yellow"),
    ClassRule("brick house in field", "field", "house", "wall", material="brick"),
)

# Distractor types are drawn with these weights (within the scene's pool) so that every object
# type, key or not, ends up in a similar share of images: types that are the key of two class
# rules (house, person, boat) are mostly drawn as keys, types of no rule (bicycle, bird, bench) only
# as distractors. Similar frequencies give similar coverage, hence IoU ceilings (see `iou_ceiling`).
_KEY_COUNT = {o.name: sum(r.object == o.name for r in CLASS_RULES) for o in OBJECTS}
DISTRACTOR_WEIGHT = {name: max(0.05, 1.0 - count / max(_KEY_COUNT.values())) for name, count in _KEY_COUNT.items()}

CGL_COLOURS = ("red", "green", "blue")
CGL_SHAPES = {"square": rect(0.0, 0.0, 1.0, 1.0), "circle": circle(0.5, 0.5, 0.5),
              "triangle": poly((0.5, 0.0), (1.0, 1.0), (0.0, 1.0))}
CGL_COMBOS = tuple(f"{c} {s}" for s in CGL_SHAPES for c in CGL_COLOURS)


@dataclass
class Catalogue:
    """Label numbers, names and categories of one preset (numbered in blocks, see the module docstring)."""

    numbers: dict[tuple[str, str], int] = field(default_factory=dict)  # (category, name) -> number
    names: dict[int, str] = field(default_factory=dict)

    def add(self, category: str, name: str, number: int | None = None) -> int:
        if number is None:
            block = LABEL_BLOCK * CATEGORIES.index(category)
            number = 1 + block + sum(1 for (c, _), n in self.numbers.items() if c == category and n > block)
        self.numbers[(category, name)] = number
        self.names[number] = name
        return number

    def number(self, category: str, name: str) -> int:
        return self.numbers[(category, name)]

    def in_category(self, category: str) -> list[tuple[str, int]]:
        return [(name, number) for (c, name), number in self.numbers.items() if c == category]

    @functools.cached_property
    def colour_lookup(self) -> np.ndarray:
        """Palette colour index (drawing.COLOUR_INDEX) -> colour label number (0 if not a label here)."""
        lookup = np.zeros(len(COLOUR_NAMES) + 1, dtype=np.int64)
        for name, number in self.in_category("color"):
            lookup[COLOUR_INDEX[name]] = number
        return lookup

    @functools.cached_property
    def texture_lookup(self) -> np.ndarray:
        lookup = np.zeros(len(TEXTURE_NAMES), dtype=np.int64)
        for name, number in self.in_category("texture"):
            lookup[TEXTURE_NAMES.index(name)] = number
        return lookup


def part_names() -> tuple[list[str], list[str]]:
    """Object part names and sub-part names of the classification preset, in first-use order."""
    parts, subparts = [], []
    for obj in OBJECTS:
        for piece in obj.pieces:
            if piece.part not in parts:
                parts.append(piece.part)
            if piece.subpart and piece.subpart not in subparts:
                subparts.append(piece.subpart)
    return parts, subparts


@functools.lru_cache(maxsize=None)
def catalogue(preset: str) -> Catalogue:
    """The label catalogue of a preset (shared, do not modify)."""
    cat = Catalogue()
    if preset == "cgl_shapes":
        for name in CGL_COLOURS:
            cat.add("color", name)
        for name in CGL_SHAPES:
            cat.add("object", name)
        for name in CGL_COMBOS:
            cat.add("part", name)
        return cat
    for name in COLOUR_NAMES:
        cat.add("color", name)
    for obj in OBJECTS:
        cat.add("object", obj.name)
    parts, subparts = part_names()
    for name in parts + subparts:
        cat.add("part", name)
    for name in MATERIALS:
        cat.add("material", name)
    for scene in SCENES:
        cat.add("scene", scene.name)
    for name in TEXTURE_NAMES:
        # the brick photo is also a material: one label in two categories, numbered as a material
        cat.add("texture", name, cat.number("material", name) if name == "brick" else None)
    return cat


# ============================================================================ sampling
@dataclass
class PartFill:
    fill: Fill
    material: str | None


def sample_fill(style: Style, rng: np.random.Generator, image_size: int, *,
                colour: str | None = None, material: str | None = None) -> PartFill:
    """A random finish of `style`; `colour` forces a plain fill of that colour, `material` a finish of it."""
    finishes = [f for f in style.finishes if material is None or f[1] == material]
    if colour is not None:
        finishes = [f for f in finishes if f[0] == _P] or [(_P, style.finishes[0][1])]
    if not finishes:
        raise ValueError(f"style has no finish of material {material!r}")
    kind, mat = finishes[rng.integers(len(finishes))]
    scale = max(1, image_size // 32)
    offset = (int(rng.integers(0, 512)), int(rng.integers(0, 512)))

    def shade() -> int:
        return int(style.shades[rng.integers(len(style.shades))])
    if kind == _P:
        name = colour or style.colours[rng.integers(len(style.colours))]
        return PartFill(Fill("plain", (name,), (shade(),)), mat)
    if kind == _W:
        return PartFill(Fill("stripes", ("brown", "brown"), (0, 1), period=2 * scale + int(rng.integers(0, 2)),
                             axis=0, offset=offset), mat)
    if kind.startswith("photo:"):
        return PartFill(Fill("photo", photo=kind.split(":", 1)[1], offset=offset), mat)
    if kind == _N:
        name = style.colours[rng.integers(len(style.colours))]
        base = tuple(int(v) for v in PALETTE[name][shade()])
        return PartFill(Fill("noise", base=base, offset=offset), mat)
    # two-colour pattern: two distinct (colour, shade) pairs
    pairs = [(c, s) for c in style.colours for s in style.shades]
    if len(pairs) < 2:
        pairs = [(c, s) for c in style.colours for s in (0, 1)]
    first, second = rng.choice(len(pairs), size=2, replace=False)
    (c1, s1), (c2, s2) = pairs[first], pairs[second]
    period = scale * int(rng.integers(3, 6))
    return PartFill(Fill(kind, (c1, c2), (s1, s2), period=period, axis=int(rng.integers(0, 3)), offset=offset), mat)


@dataclass
class Instance:
    """An object to draw: type, bounding box (x, y, w, h in pixels), a fill per style, key or not."""

    kind: ObjectType
    box: tuple[float, float, float, float]
    fills: dict[str, PartFill]
    key: bool


def satisfies(rule: ClassRule, instance: Instance) -> bool:
    """Attribute-level test: does this instance make `rule` true (scene aside)?"""
    if instance.kind.name != rule.object:
        return False
    for piece in instance.kind.pieces:
        if piece.part != rule.part:
            continue
        painted = instance.fills[piece.style_name]
        if rule.colour is not None and rule.colour in painted.fill.named_colours:
            return True
        if rule.material is not None and painted.material == rule.material:
            return True
    return False


def _sample_instance(kind: ObjectType, rng, size: int, horizon: float, config: WorldConfig, key_rule, avoid) -> Instance:
    area = rng.uniform(*config.object_area) * size * size
    height = min(np.sqrt(area / kind.aspect), size * 0.95)
    width = min(height * kind.aspect, size * 0.95)
    x = rng.uniform(0, size - width)
    if kind.placement == "any":
        y = rng.uniform(0, size - height)
    else:
        low = min(max(horizon + 0.25 * height, height), size)
        y = rng.uniform(low, size) - height
    fills = {}
    for piece in kind.pieces:
        name = piece.style_name
        if name in fills:
            continue
        forced = key_rule is not None and piece.part == key_rule.part
        fills[name] = sample_fill(STYLES[name], rng, size,
                                  colour=key_rule.colour if forced else None,
                                  material=key_rule.material if forced else None)
    instance = Instance(kind, (x, y, width, height), fills, key_rule is not None)
    for _ in range(100):  # resample the styles that make a rule of this scene true
        offending = [r for r in avoid if satisfies(r, instance)]
        if not offending:
            return instance
        for rule in offending:
            for piece in kind.pieces:
                if piece.part == rule.part and not (key_rule is not None and piece.part == key_rule.part):
                    fills[piece.style_name] = sample_fill(STYLES[piece.style_name], rng, size)
    raise RuntimeError(f"could not draw a {kind.name} that avoids rules {avoid}; widen the styles' colours.")


# ============================================================================ rendering
@dataclass
class Rendered:
    """One image and its annotations at image resolution (regions index the tables)."""

    canvas: Canvas
    class_id: int
    scene: str | None
    region_object: list[int]  # label numbers per region id (index 0 = background)
    region_part: list[int]
    region_subpart: list[int]
    region_material: list[int]
    region_key: list[bool]
    region_instance: list[int]  # instance number per region (-1 background)
    instances: list[tuple[str, str]]  # (object name, role) per instance


def _new_rendered(size: int, class_id: int, scene: str | None) -> Rendered:
    return Rendered(Canvas(size), class_id, scene, [0], [0], [0], [0], [False], [-1], [])


def _draw(rendered: Rendered, instance: Instance, cat: Catalogue, rng) -> None:
    """Rasterise every piece of `instance`; pieces of one (part, sub-part, style) share a region id."""
    canvas = rendered.canvas
    rows, cols, u, v = box_window(instance.box, canvas.size)
    number = len(rendered.instances)
    rendered.instances.append((instance.kind.name, "key" if instance.key else "distractor"))
    regions: dict[tuple, int] = {}
    for piece in instance.kind.pieces:
        signature = (piece.part, piece.subpart, piece.style_name)
        if signature not in regions:
            regions[signature] = len(rendered.region_object)
            painted = instance.fills[piece.style_name]
            rendered.region_object.append(cat.number("object", instance.kind.name))
            rendered.region_part.append(cat.number("part", piece.part))
            rendered.region_subpart.append(cat.number("part", piece.subpart) if piece.subpart else 0)
            rendered.region_material.append(cat.number("material", painted.material) if painted.material else 0)
            rendered.region_key.append(instance.key)
            rendered.region_instance.append(number)
        mask = shape_mask(piece.shape, u, v, instance.box[2], instance.box[3])
        canvas.paint(rows, cols, mask, instance.fills[piece.style_name].fill, regions[signature], rng)


def render_classification(config: WorldConfig, class_id: int, rng: np.random.Generator, cat: Catalogue) -> Rendered:
    """One image of class `class_id`: the scene's background, distractors, then the key object on top."""
    rule = CLASS_RULES[class_id]
    scene = SCENE_BY_NAME[rule.scene]
    size = config.image_size
    rendered = _new_rendered(size, class_id, scene.name)
    horizon = int(round(rng.uniform(*scene.horizon) * size))
    rendered.canvas.fill_rows(0, horizon, sample_fill(STYLES[scene.upper], rng, size).fill, rng)
    rendered.canvas.fill_rows(horizon, size, sample_fill(STYLES[scene.lower], rng, size).fill, rng)
    scene_rules = [r for r in CLASS_RULES if r.scene == scene.name]
    confusers = sorted({r.object for r in scene_rules})
    others = [r for r in scene_rules if r is not rule]
    weights = np.array([DISTRACTOR_WEIGHT[name] for name in scene.pool])
    n_distractors = int(rng.integers(config.distractors[0], config.distractors[1] + 1))
    for _ in range(n_distractors):
        if rng.random() < config.confuser_rate:
            name = confusers[rng.integers(len(confusers))]
        else:
            name = scene.pool[rng.choice(len(scene.pool), p=weights / weights.sum())]
        kind = OBJECT_BY_NAME[name]
        _draw(rendered, _sample_instance(kind, rng, size, horizon, config, None, scene_rules), cat, rng)
    key = _sample_instance(OBJECT_BY_NAME[rule.object], rng, size, horizon, config, rule, others)
    _draw(rendered, key, cat, rng)
    return rendered


def cgl_classes(task: str) -> list[tuple[str, str]]:
    """(class name, superclass) per class id of the CGL task."""
    if task == "binary":
        return [("no square", "no square"), ("square", "square")]
    pairs = [(a, b) for i, a in enumerate(CGL_COMBOS) for b in CGL_COMBOS[i:]]
    return [(f"{a} + {b}", " + ".join(sorted((a.split()[1], b.split()[1])))) for a, b in pairs]


def render_cgl(config: WorldConfig, rng: np.random.Generator, cat: Catalogue) -> Rendered:
    """Two non-overlapping coloured shapes on black; class from `cgl_task`."""
    size = config.image_size
    rendered = _new_rendered(size, 0, None)
    rendered.canvas.fill_rows(0, size, Fill("plain", ("black",), (0,)), rng)
    boxes, combos = [], []
    for _ in range(2):
        for _attempt in range(200):
            side = rng.uniform(*config.cgl_shape_size) * size
            x, y = rng.uniform(0, size - side, size=2)
            box = (x, y, side, side)
            if all(x + side + 1 <= bx or bx + bs + 1 <= x or y + side + 1 <= by or by + bs + 1 <= y
                   for bx, by, bs, _ in boxes):
                break
        else:
            raise RuntimeError("could not place two non-overlapping shapes; lower cgl_shape_size.")
        boxes.append(box)
        combos.append((CGL_COLOURS[rng.integers(3)], list(CGL_SHAPES)[rng.integers(3)]))
    squares = any(shape == "square" for _, shape in combos)
    names = [f"{c} {s}" for c, s in combos]
    if config.cgl_task == "binary":
        rendered.class_id = int(squares)
    else:
        classes = [name for name, _ in cgl_classes("combination")]
        rendered.class_id = classes.index(" + ".join(sorted(names, key=CGL_COMBOS.index)))
    for box, (colour, shape) in zip(boxes, combos):
        key = shape == "square" if config.cgl_task == "binary" else True
        number = len(rendered.instances)
        rendered.instances.append((shape, "key" if key else "distractor"))
        region = len(rendered.region_object)
        rendered.region_object.append(cat.number("object", shape))
        rendered.region_part.append(cat.number("part", f"{colour} {shape}"))
        rendered.region_subpart.append(0)
        rendered.region_material.append(0)
        rendered.region_key.append(key)
        rendered.region_instance.append(number)
        rows, cols, u, v = box_window(box, size)
        mask = shape_mask(CGL_SHAPES[shape], u, v, box[2], box[3])
        rendered.canvas.paint(rows, cols, mask, Fill("plain", (colour,), (0,)), region, rng)
    return rendered


# ============================================================================ writing one image
def sample_positions(image: int, mask: int) -> np.ndarray:
    """Image row (or column) under the centre of each mask row: floor((i + ½)·image/mask)."""
    return ((np.arange(mask) + 0.5) * image / mask).astype(np.intp)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.write_bytes(encode_png(array, PNG_COMPRESS_LEVEL))


def _write_image(config: WorldConfig, out: Path, index: int, split: str, class_id: int) -> dict:
    """Render image `index` with its own seed, write its PNGs, return its index/task/statistics record."""
    cat = catalogue(config.preset)
    rng = np.random.default_rng([config.seed, index])
    if config.preset == "cgl_shapes":
        rendered = render_cgl(config, rng, cat)
    else:
        rendered = render_classification(config, class_id, rng, cat)
    canvas = rendered.canvas
    stem = f"cw_{index:06d}"
    _save_png(canvas.rgb, out / "images" / f"{stem}.png")

    rows = sample_positions(config.image_size, config.mask_size)
    region = canvas.region[np.ix_(rows, rows)]
    planes = {
        "color": cat.colour_lookup[canvas.colour[np.ix_(rows, rows)]],
        "object": np.asarray(rendered.region_object)[region],
        "part_1": np.asarray(rendered.region_part)[region],
        "part_2": np.asarray(rendered.region_subpart)[region],
        "material": np.asarray(rendered.region_material)[region],
    }
    record = {"image": f"{stem}.png", "split": split, "ih": config.image_size, "iw": config.image_size,
              "sh": config.mask_size, "sw": config.mask_size, "part": [], "counts": {}}
    for name, plane in planes.items():
        if not plane.any():
            continue
        _save_png(encode_label_mask(plane), out / "images" / f"{stem}_{name}.png")
        category = name.split("_")[0]
        if category == "part":
            record["part"].append(f"{stem}_{name}.png")
        else:
            record[category] = f"{stem}_{name}.png"
        numbers, counts = np.unique(plane[plane > 0], return_counts=True)
        merged = record["counts"].setdefault(category, {})
        for number, count in zip(numbers.tolist(), counts.tolist()):
            merged[number] = merged.get(number, 0) + count / plane.size
    image_labels = {}
    if rendered.scene is not None:
        image_labels["scene"] = [cat.number("scene", rendered.scene)]
        area = np.bincount(canvas.texture.ravel(), minlength=len(TEXTURE_NAMES)) / canvas.texture.size
        order = [t for t in np.argsort(-area, kind="stable") if area[t] >= config.texture_min_fraction]
        image_labels["texture"] = [int(cat.texture_lookup[t]) for t in order]
    for category, numbers in image_labels.items():
        record[category] = ";".join(str(n) for n in numbers)
        record["counts"][category] = {n: 1.0 for n in numbers}
    record["part"] = ";".join(record["part"])

    evidence = np.asarray(rendered.region_key, dtype=bool)[region]
    _save_png((evidence * 255).astype(np.uint8), out / "evidence" / f"{stem}.png")
    record["class_id"] = rendered.class_id
    record["instances"] = _instances(rendered, cat, f"{stem}.png", split)
    return record


def _instances(rendered: Rendered, cat: Catalogue, image: str, split: str) -> list[tuple]:
    """Visible box (image pixels, bottom/right exclusive) of every object instance and each of its parts."""
    region_instance = np.asarray(rendered.region_instance)
    region_part = np.asarray(rendered.region_part)
    visible = region_instance[rendered.canvas.region]
    rows = []
    for number, (name, role) in enumerate(rendered.instances):
        ys, xs = np.nonzero(visible == number)
        if ys.size == 0:
            continue
        rows.append((image, split, "object", name, cat.number("object", name), name, role,
                     int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1, int(ys.size)))
        parts = region_part[rendered.canvas.region[ys, xs]]
        for part in np.unique(parts).tolist():
            inside = parts == part
            py, px = ys[inside], xs[inside]
            rows.append((image, split, "part", cat.names[part], part, name, role,
                         int(py.min()), int(px.min()), int(py.max()) + 1, int(px.max()) + 1, int(py.size)))
    return rows


def _write_chunk(job: tuple) -> list[dict]:
    config, out, items = job
    return [_write_image(config, Path(out), index, split, class_id) for index, split, class_id in items]


# ============================================================================ the dataset
def _assignments(config: WorldConfig) -> tuple[list[str], list[int]]:
    """Split per image (exactly round(val_fraction·n) val images) and balanced class ids, seeded."""
    rng = np.random.default_rng([config.seed, 2**31 - 1])
    n = config.n_images
    splits = np.full(n, "train", dtype=object)
    splits[rng.permutation(n)[: int(round(config.val_fraction * n))]] = "val"
    classes = rng.permutation(np.arange(n) % len(CLASS_RULES)).tolist()
    return splits.tolist(), classes


def _format(value: float) -> str:
    return f"{value:.6g}"


def _csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_tables(config: WorldConfig, out: Path, records: list[dict]) -> None:
    cat = catalogue(config.preset)
    index_rows = [[r.get(column, "") for column in INDEX_HEADER] for r in records]
    io.write_text(out / "index.csv", _csv_text(INDEX_HEADER, index_rows))

    frequency: dict[tuple[str, int], int] = {}
    coverage: dict[tuple[str, int], float] = {}
    images: dict[int, int] = {}  # images carrying the label in any category
    for record in records:
        for category, counts in record["counts"].items():
            for number, share in counts.items():
                frequency[(category, number)] = frequency.get((category, number), 0) + 1
                coverage[(category, number)] = coverage.get((category, number), 0.0) + share
        for number in {n for counts in record["counts"].values() for n in counts}:
            images[number] = images.get(number, 0) + 1
    categories = [c for c in CATEGORIES if cat.in_category(c)]
    label_rows = []
    for number in sorted(cat.names):
        member = [c for c in categories if any(n == number for _, n in cat.in_category(c))]
        label_rows.append([number, cat.names[number],
                           ";".join(f"{c}({frequency.get((c, number), 0)})" for c in member),
                           images.get(number, 0), _format(sum(coverage.get((c, number), 0.0) for c in member)), ""])
    io.write_text(out / "label.csv", _csv_text(("number", "name", "category", "frequency", "coverage", "syns"), label_rows))

    category_rows = []
    for category in categories:
        members = sorted(cat.in_category(category), key=lambda item: item[1])
        rows = [[code, number, name, frequency.get((category, number), 0), _format(coverage.get((category, number), 0.0))]
                for code, (name, number) in enumerate(members, start=1)]
        io.write_text(out / f"c_{category}.csv", _csv_text(("code", "number", "name", "frequency", "coverage"), rows))
        present = sum(1 for r in records if r["counts"].get(category))
        numbers = [number for _, number in members]
        category_rows.append([category, min(numbers), max(numbers), len(numbers), present])
    io.write_text(out / "category.csv", _csv_text(("name", "first", "last", "count", "frequency"), category_rows))

    classes = _class_table(config)
    task_rows = [[r["image"], r["split"], r["class_id"], *classes[r["class_id"]]] for r in records]
    io.write_text(out / "tasks.csv", _csv_text(TASK_HEADER, task_rows))
    io.write_text(out / "instances.csv", _csv_text(INSTANCE_HEADER, [row for r in records for row in r["instances"]]))
    io.write_json(out / "classes.json", _classes_json(config, classes))
    io.write_json(out / "concept_tree.json", concept_tree(config.preset))
    io.write_json(out / "world.json", {
        "generator": generator_identity(),
        "config": cache.canonical(config),
        "n_images": len(records),
        "label_numbering": "blocks of 100 per category (color 1.., object 101.., part 201.., material 301.., "
                           "scene 401.., texture 501..); numbers between blocks are unused",
        "mask_sampling": "mask pixel (i, j) = image pixel (floor((i+0.5)*ih/sh), floor((j+0.5)*iw/sw))",
        "evidence": "evidence/<image>: 255 where the pixel belongs to an object that makes the image's class",
    })


def _class_table(config: WorldConfig) -> list[tuple[str, str]]:
    if config.preset == "cgl_shapes":
        return cgl_classes(config.cgl_task)
    return [(rule.name, rule.superclass) for rule in CLASS_RULES]


def _classes_json(config: WorldConfig, classes: list[tuple[str, str]]) -> dict:
    hierarchy: dict[str, list[str]] = {}
    for name, superclass in classes:
        hierarchy.setdefault(superclass, []).append(name)
    table = [{"id": i, "name": name, "superclass": superclass} for i, (name, superclass) in enumerate(classes)]
    if config.preset == "cgl_shapes":
        semantics = ("binary: class 1 iff one of the two shapes is a square" if config.cgl_task == "binary"
                     else "the unordered pair of the two (colour, shape) combinations")
        groups = {"color": list(CGL_COLOURS), "shape": list(CGL_SHAPES), "color-shape": list(CGL_COMBOS)}
        stored_as = {"color": "color", "shape": "object", "color-shape": "part"}
        return {"preset": config.preset, "task": config.cgl_task, "classes": table, "hierarchy": hierarchy,
                "rule_semantics": semantics, "concept_groups": groups, "concept_groups_category": stored_as}
    for entry, rule in zip(table, CLASS_RULES):
        entry["rule"] = rule.as_dict()
    return {
        "preset": config.preset, "classes": table, "hierarchy": hierarchy,
        "rule_semantics": "class c iff the image's scene is rule.scene and some pixel carries object rule.object, "
                          "part rule.part and colour rule.color (or material rule.material); exactly one "
                          "class rule holds for every image (distractors are drawn so as to satisfy none)",
        "distractors": list(config.distractors),
    }


def concept_tree(preset: str) -> dict:
    """The concept hierarchy over objects and parts as nested {name, category, label, children}.

    Classification: thing → group (structure, vehicle, plant, animal, furniture) → object → its
    parts → sub-parts. A part shared by several objects (window, wheel, body, head, leg) appears
    under each of them with the same label. CGL: shape → its three colour-shapes.
    """
    cat = catalogue(preset)

    def node(name, category=None, children=()):
        return {"name": name, "category": category,
                "label": cat.number(category, name) if category else None, "children": list(children)}

    if preset == "cgl_shapes":
        return node("shape", None, [node(s, "object", [node(f"{c} {s}", "part") for c in CGL_COLOURS])
                                    for s in CGL_SHAPES])
    groups: dict[str, list] = {}
    for obj in OBJECTS:
        parts: dict[str, list[str]] = {}
        for piece in obj.pieces:
            subs = parts.setdefault(piece.part, [])
            if piece.subpart and piece.subpart not in subs:
                subs.append(piece.subpart)
        children = [node(part, "part", [node(s, "part") for s in subs]) for part, subs in parts.items()]
        groups.setdefault(obj.group, []).append(node(obj.name, "object", children))
    return node("thing", None, [node(group, None, members) for group, members in groups.items()])


def generate_world(config: WorldConfig, out_dir: str | os.PathLike, *, workers: int | None = None,
                   overwrite: bool = False) -> Path:
    """Write the world of `config` into `out_dir` atomically (temp folder beside it, renamed at the end).

    Each image is drawn from its own seed (config.seed, index), so the files are byte-identical
    whatever `workers` (default: up to 2 processes). An existing `out_dir` is an error unless
    `overwrite`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or pass overwrite=True (`--overwrite` on the command line).")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for tag in ("tmp", "old"):
        io.remove_stale_scratch(out_dir, tag)  # left by a killed run
    tmp = io.scratch_path(out_dir, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    (tmp / "evidence").mkdir()
    try:
        splits, classes = _assignments(config)
        items = list(zip(range(config.n_images), splits, classes))
        chunk = 50
        jobs = [(config, str(tmp), items[i : i + chunk]) for i in range(0, len(items), chunk)]
        workers = min(2, os.cpu_count() or 1) if workers is None else workers
        catalogue(config.preset)  # built once here, inherited by forked workers
        if config.preset == "classification":
            for name in PHOTOS:
                photo_tile(name, config.image_size)
        records: list[dict] = []
        if workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            with context.Pool(workers) as pool:
                for part in progress(pool.imap(_write_chunk, jobs), desc="ConceptWorld", total=len(jobs)):
                    records.extend(part)
        else:
            for job in progress(jobs, desc="ConceptWorld", total=len(jobs)):
                records.extend(_write_chunk(job))
        _write_tables(config, tmp, records)
        cache.mark_done(tmp, {"generator": generator_identity(), "config": config})
        io.replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def generator_identity() -> dict:
    """Version and source hash of the generator: any change to the drawing code gives new cache keys,
    so a cached world (and every model trained on it) is never silently stale."""
    digest = hashlib.sha256()
    for module in (Path(__file__), Path(__file__).with_name("drawing.py")):
        digest.update(module.read_bytes())
    return {"version": GENERATOR_VERSION, "source_sha256": digest.hexdigest()[:16]}


def world_dir(config: WorldConfig) -> Path:
    """The cache folder of a config: `paths.data_dir()/concept_world/<hash of config and generator identity>`."""
    return paths.data_dir() / "concept_world" / cache.config_hash({"generator": generator_identity(), "config": config})


def ensure_world(config: WorldConfig, *, workers: int | None = None) -> Path:
    """The cached world of `config`, generated first if absent or unfinished.

    A finished folder must record this very configuration and generator: a world written there by
    hand (another seed, another profile) is refused, never served in its place.
    """
    folder = world_dir(config)
    identity = {"generator": generator_identity(), "config": config}
    if not cache.is_done(folder):
        generate_world(config, folder, workers=workers, overwrite=True)
    elif not cache.done_matches(folder, identity):
        raise ValueError(
            f"the cached world {folder} records another configuration than the one requested "
            f"({config}); delete that folder and rerun: it is regenerated."
        )
    return folder


# ============================================================================ reading helpers
def iou_ceiling(coverage, quantile: float = 0.005):
    """Best IoU a unit thresholded at its top `quantile` can reach on a concept covering `coverage`.

    The thresholded region covers `quantile` of all positions; at best it lies inside the concept
    (coverage ≥ quantile) or contains it (coverage ≤ quantile): IoU = min/max (spec section 9).
    """
    coverage = np.asarray(coverage, dtype=np.float64)
    return np.where(coverage > 0, np.minimum(coverage, quantile) / np.maximum(coverage, quantile), 0.0)


def concept_coverage(root: str | os.PathLike, quantile: float = 0.005):
    """Per (category, concept): images, coverage as a fraction of all mask pixels, and its IoU ceiling."""
    import pandas as pd

    root = Path(root)
    n_images = len(pd.read_csv(root / "index.csv"))
    names = pd.read_csv(root / "category.csv")["name"]
    frames = []
    for category in names:
        table = pd.read_csv(root / f"c_{category}.csv", keep_default_na=False)
        frames.append(pd.DataFrame({"category": category, "concept": table["name"], "label": table["number"],
                                    "images": table["frequency"], "coverage": table["coverage"] / n_images}))
    frame = pd.concat(frames, ignore_index=True)
    frame["iou_ceiling"] = iou_ceiling(frame["coverage"].to_numpy(), quantile)
    return frame


def _members(tree: dict, name: str) -> list[tuple[str, str]]:
    """(category, name) whose instances form the set of tree node `name`.

    A labelled node (object or part) stands for itself; an internal node (vehicle, plant, ...) for
    the top-most labelled nodes below it, i.e. its objects. Unknown names give [].
    """
    def find(node):
        if node["name"] == name:
            return node
        for child in node["children"]:
            found = find(child)
            if found is not None:
                return found
        return None

    def top_labelled(node):
        if node["category"]:
            return [(node["category"], node["name"])]
        return [member for child in node["children"] for member in top_labelled(child)]

    found = find(tree)
    return [] if found is None else sorted(set(top_labelled(found)))


def concept_image_sets(root: str | os.PathLike, concepts: Sequence[str] | None = None, *, split: str | None = None,
                       min_pixels: int = 16, min_fraction: float = 0.0, margin: float = 0.15,
                       limit: int | None = None) -> dict:
    """Per concept, the image crops where it is prominent (for concept-whitening concept sets).

    `concepts`: object/part names or internal nodes of `concept_tree.json` (an internal node's set is
    the union of its objects' crops, spec 01 open point 3); None = every object and part. A part
    shared by several objects (window) collects its crops from all of them.
    An instance qualifies when at least `min_pixels` of it are visible and it covers at least
    `min_fraction` of the image. Boxes are enlarged by `margin` of their size on each side, clipped
    to the image. Returns {concept: DataFrame(image, split, top, left, bottom, right, pixels, ...)},
    the largest `limit` instances first (ties by image name).
    """
    import pandas as pd

    root = Path(root)
    if not (root / "instances.csv").is_file():
        raise FileNotFoundError(f"{root / 'instances.csv'} is missing; concept image sets need a ConceptWorld "
                                "folder (generate one with `python -m replication world`).")
    table = pd.read_csv(root / "instances.csv")
    size = pd.read_csv(root / "index.csv", usecols=["image", "ih", "iw"]).set_index("image")
    tree = io.read_json(root / "concept_tree.json")
    if split is not None:
        table = table[table["split"] == split]
    if concepts is None:
        concepts = sorted(set(table["concept"]))
    height = size.loc[table["image"], "ih"].to_numpy()
    width = size.loc[table["image"], "iw"].to_numpy()
    keep = (table["pixels"] >= min_pixels) & (table["pixels"] >= min_fraction * height * width)
    table = table[keep.to_numpy()].copy()
    height, width = height[keep.to_numpy()], width[keep.to_numpy()]
    box_h, box_w = table["bottom"] - table["top"], table["right"] - table["left"]
    table["top"] = np.maximum(0, np.floor(table["top"] - margin * box_h)).astype(int)
    table["left"] = np.maximum(0, np.floor(table["left"] - margin * box_w)).astype(int)
    table["bottom"] = np.minimum(height, np.ceil(table["bottom"] + margin * box_h)).astype(int)
    table["right"] = np.minimum(width, np.ceil(table["right"] + margin * box_w)).astype(int)
    sets = {}
    for concept in concepts:
        members = _members(tree, concept) or [(c, concept) for c in ("object", "part")]
        chosen = pd.concat([table[(table["category"] == c) & (table["concept"] == n)] for c, n in members])
        if chosen.empty:
            raise ValueError(f"no instance of concept {concept!r} passes min_pixels={min_pixels}, "
                             f"min_fraction={min_fraction} in {root} (split={split}); lower them or check the name.")
        chosen = chosen.sort_values(["pixels", "image"], ascending=[False, True], kind="stable")
        sets[concept] = (chosen if limit is None else chosen.head(limit)).reset_index(drop=True)
    return sets


__all__ = [
    "WorldConfig", "generate_world", "ensure_world", "world_dir", "catalogue", "concept_tree", "iou_ceiling",
    "concept_coverage", "concept_image_sets", "CLASS_RULES", "OBJECTS", "SCENES", "MATERIALS", "PRESETS",
    "sample_positions",
]
