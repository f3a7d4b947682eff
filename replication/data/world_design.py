"""ConceptWorld's design: `WorldConfig` (the [world] profile section) and the concept catalogue
(object types and their parts, styles, scenes, the class rules of the classification preset, CGL's
shapes), `catalogue(preset)`. Pure data and its checks; rendering and writing live in
`world_render` and `concept_world`."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from replication.data.broden import CATEGORIES
from replication.data.drawing import (
    COLOUR_INDEX,
    COLOUR_NAMES,
    TEXTURE_NAMES,
    both,
    circle,
    ellipse,
    poly,
    rect,
)


GENERATOR_VERSION = 2  # part of every cache key, with a hash of the generator's source (see generator_identity)
PRESETS = ("classification", "cgl_shapes")
CGL_TASKS = ("binary", "combination")
LABEL_BLOCK = 100
INDEX_HEADER = ("image", "split", "ih", "iw", "sh", "sw", "color", "object", "part", "material", "scene", "texture")
TASK_HEADER = ("image", "split", "class_id", "class_name", "superclass")
INSTANCE_HEADER = ("image", "split", "category", "concept", "label", "object", "role",
                   "top", "left", "bottom", "right", "pixels")
PNG_COMPRESS_LEVEL = 1  # zlib level: lossless either way, level 1 is the fastest that still compresses
DEFAULT_DITHER = {"classification": 3, "cgl_shapes": 0}
MAX_DITHER = 16


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a ConceptWorld; the field names are the keys of the [world]/[cgl_world] profiles.

    `mask_size` None means image_size // 2 (Broden's rule). `distractors`: (min, max) objects of the
    types of no class rule per image (drawn from one pool in every scene, so that the set of object
    types does not tell the scene); `confuser_rate`: chance that an image also holds a confuser,
    another key object type of its scene whose key part wears another rule colour of the scene, so
    that neither the object types nor the colours present decide the class; `object_area`: (min, max)
    bounding-box area of an object as a fraction of the image (with the object frequencies it sets
    concept coverage, hence the IoU ceilings, see `iou_ceiling`); `texture_min_fraction`: share of an
    image a texture must cover to become one of its texture labels; `dither`: amplitude of the seeded
    per-pixel noise (an integer in [-dither, dither] added to every channel of every pixel) that keeps
    flat fills from giving exactly equal pixels, hence exactly tied network activations at a
    dissection threshold; None means 3 for "classification" and 0 (flat fills, as CGL's task) for
    "cgl_shapes". `cgl_task`: "binary" or "combination"; `cgl_shape_size`: (min, max) shape side as a
    fraction of the image side.
    """

    preset: str = "classification"
    n_images: int = 1000
    image_size: int = 64
    mask_size: int | None = None
    seed: int = 0
    val_fraction: float = 0.3
    distractors: tuple[int, int] = (0, 2)
    confuser_rate: float = 0.8
    object_area: tuple[float, float] = (0.08, 0.16)
    texture_min_fraction: float = 0.2
    dither: int | None = None
    cgl_task: str = "binary"
    cgl_shape_size: tuple[float, float] = (0.18, 0.26)

    def __post_init__(self):
        if self.mask_size is None:
            object.__setattr__(self, "mask_size", self.image_size // 2)
        if self.dither is None and self.preset in DEFAULT_DITHER:
            object.__setattr__(self, "dither", DEFAULT_DITHER[self.preset])
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
        if self.dither is not None and not 0 <= self.dither <= MAX_DITHER:
            problems.append(f"dither = {self.dither} must lie in [0, {MAX_DITHER}] (grey levels)")
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
    """Allowed finishes ((kind, material) pairs), colour names and shades for an object part."""

    finishes: tuple[tuple[str, str | None], ...]
    colours: tuple[str, ...]
    shades: tuple[int, ...] = (0, 1)


KEY_COLOURS = ("red", "blue", "yellow", "green", "purple", "orange")
PLAIN, STRIPES, DOTS, CHECKER, NOISE, WOOD = "plain", "stripes", "dots", "checker", "noise", "wood"  # wood: brown "grain" pattern
STYLES: dict[str, Style] = {
    # key parts (the part of a class rule): plain in the rule colour when they make or confuse a
    # class, so their palettes hold all six key colours
    "car_body": Style(((PLAIN, "metal"),), (*KEY_COLOURS, "white", "black", "gray")),
    "shade": Style(((PLAIN, "fabric"), (PLAIN, "glass")), (*KEY_COLOURS, "white")),
    "torso": Style(((PLAIN, "fabric"), (STRIPES, "fabric"), (CHECKER, "fabric"), (DOTS, "fabric")), (*KEY_COLOURS, "white", "black")),
    "bird_body": Style(((PLAIN, None), (NOISE, None)), (*KEY_COLOURS, "brown", "black", "white")),
    "petal": Style(((PLAIN, None), (DOTS, None)), (*KEY_COLOURS, "pink", "white")),
    "canopy": Style(((PLAIN, "fabric"), (STRIPES, "fabric")), (*KEY_COLOURS, "pink", "black", "white")),
    # other parts; the palettes of most hold the six key colours too (see `_spread_key_colours`)
    "wall": Style(((PLAIN, None), (STRIPES, None), ("photo:brick", "brick"), (WOOD, "wood")),
                  (*KEY_COLOURS, "white", "pink", "gray")),
    "roof": Style(((PLAIN, None), (CHECKER, None)), (*KEY_COLOURS, "brown", "gray", "black")),
    "door": Style(((WOOD, "wood"), (PLAIN, "wood")), (*KEY_COLOURS, "brown", "black")),
    "window": Style(((PLAIN, "glass"),), ("blue", "white")),
    "trunk": Style(((PLAIN, "wood"), (WOOD, "wood")), ("brown",)),
    "crown": Style(((PLAIN, "foliage"), (DOTS, "foliage"), (NOISE, "foliage")), ("green", "orange", "yellow", "red")),
    "tire": Style(((PLAIN, "rubber"),), ("black",), (0,)),
    "hub": Style(((PLAIN, "metal"),), ("gray", "white", "yellow")),
    "hull": Style(((PLAIN, "wood"), (WOOD, "wood"), (STRIPES, "wood"), (PLAIN, "metal")), (*KEY_COLOURS, "white", "brown", "black")),
    "sail": Style(((PLAIN, "fabric"), (STRIPES, "fabric")), (*KEY_COLOURS, "white")),
    "stem": Style(((PLAIN, "foliage"),), ("green",)),
    "face": Style(((PLAIN, "skin"),), ("pink", "orange", "brown"), (1,)),
    "hair": Style(((PLAIN, None),), ("black", "brown", "yellow", "orange")),
    "person_leg": Style(((PLAIN, "fabric"), (STRIPES, "fabric")), (*KEY_COLOURS, "black", "gray", "brown")),
    "pole": Style(((PLAIN, "metal"), (PLAIN, "wood"), (STRIPES, "metal")), (*KEY_COLOURS, "gray", "black")),
    "frame": Style(((PLAIN, "metal"), (STRIPES, "metal")), (*KEY_COLOURS, "black")),
    "wing": Style(((PLAIN, None), (STRIPES, None)), (*KEY_COLOURS, "brown", "black", "white", "gray")),
    "seat": Style(((WOOD, "wood"), (PLAIN, "wood"), (STRIPES, "wood"), (PLAIN, "metal")), (*KEY_COLOURS, "brown")),
    "bench_leg": Style(((PLAIN, "metal"),), (*KEY_COLOURS, "black", "gray")),
    "handle": Style(((PLAIN, "metal"), (PLAIN, "wood"), (WOOD, "wood")), (*KEY_COLOURS, "black", "gray", "brown")),
}

OBJECTS: tuple[ObjectType, ...] = (
    ObjectType("house", "structure", 1.0, "ground", (
        Piece("wall", rect(0.08, 0.45, 0.92, 1.0)),
        Piece("roof", poly((0.0, 0.48), (0.5, 0.0), (1.0, 0.48))),
        Piece("door", rect(0.38, 0.58, 0.64, 1.0)),
        Piece("window", rect(0.12, 0.55, 0.34, 0.8)),
        Piece("window", rect(0.7, 0.55, 0.9, 0.8)),
    )),
    ObjectType("lamp", "structure", 0.6, "ground", (
        Piece("pole", rect(0.34, 0.35, 0.66, 1.0)),
        Piece("pole", rect(0.1, 0.88, 0.9, 1.0)),
        Piece("shade", poly((0.0, 0.45), (1.0, 0.45), (0.8, 0.0), (0.2, 0.0))),
    )),
    ObjectType("car", "vehicle", 1.8, "ground", (
        Piece("body", poly((0.18, 0.42), (0.28, 0.04), (0.76, 0.04), (0.88, 0.42)), style="car_body"),
        Piece("body", rect(0.0, 0.4, 1.0, 0.8), style="car_body"),
        Piece("window", rect(0.31, 0.11, 0.5, 0.4)),
        Piece("window", rect(0.54, 0.11, 0.74, 0.4)),
        Piece("wheel", circle(0.24, 0.76, 0.24), subpart="tire"),
        Piece("wheel", circle(0.76, 0.76, 0.24), subpart="tire"),
        Piece("wheel", circle(0.24, 0.76, 0.13), subpart="hub"),
        Piece("wheel", circle(0.76, 0.76, 0.13), subpart="hub"),
    )),
    ObjectType("boat", "vehicle", 1.25, "ground", (
        Piece("hull", poly((0.0, 0.6), (1.0, 0.6), (0.82, 1.0), (0.18, 1.0))),
        Piece("sail", poly((0.52, 0.0), (0.52, 0.58), (0.96, 0.58))),
        Piece("sail", poly((0.48, 0.08), (0.48, 0.58), (0.08, 0.58))),
    )),
    ObjectType("bicycle", "vehicle", 1.6, "ground", (
        Piece("wheel", circle(0.22, 0.68, 0.32), subpart="tire"),
        Piece("wheel", circle(0.78, 0.68, 0.32), subpart="tire"),
        Piece("wheel", circle(0.22, 0.68, 0.17), subpart="hub"),
        Piece("wheel", circle(0.78, 0.68, 0.17), subpart="hub"),
        Piece("frame", rect(0.2, 0.38, 0.8, 0.6)),
        Piece("frame", rect(0.38, 0.08, 0.56, 0.68)),
        Piece("frame", rect(0.68, 0.0, 0.86, 0.6)),
        Piece("frame", rect(0.26, 0.0, 0.62, 0.2)),
    )),
    ObjectType("tree", "plant", 0.75, "ground", (
        Piece("trunk", rect(0.32, 0.45, 0.68, 1.0)),
        Piece("crown", ellipse(0.5, 0.33, 0.5, 0.33)),
    )),
    ObjectType("flower", "plant", 0.65, "ground", (
        Piece("stem", rect(0.36, 0.45, 0.64, 1.0)),
        Piece("stem", ellipse(0.72, 0.74, 0.28, 0.12)),
        Piece("petal", circle(0.5, 0.27, 0.27)),
    )),
    ObjectType("person", "animal", 0.5, "ground", (
        Piece("leg", rect(0.16, 0.6, 0.46, 1.0), style="person_leg"),
        Piece("leg", rect(0.54, 0.6, 0.84, 1.0), style="person_leg"),
        Piece("torso", rect(0.04, 0.27, 0.96, 0.62)),
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
    ObjectType("umbrella", "furniture", 1.1, "ground", (
        Piece("canopy", both(ellipse(0.5, 0.48, 0.5, 0.46), rect(0.0, 0.0, 1.0, 0.48))),
        Piece("handle", rect(0.44, 0.44, 0.58, 1.0)),
        Piece("handle", rect(0.28, 0.88, 0.58, 1.0)),
    )),
)
OBJECT_BY_NAME = {o.name: o for o in OBJECTS}
MATERIALS = ("glass", "wood", "metal", "fabric", "brick", "foliage", "skin", "rubber")

Tint = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]  # HSV ranges: hue (degrees), saturation, value
_SKY: Tint = ((195, 225), (0.12, 0.35), (0.78, 0.95))


@dataclass(frozen=True)
class Scene:
    """A background: two bands split at the horizon; `textured` ("upper" or "lower") is painted with
    one of `textures`, the other as a smooth vertical gradient; each band's tints from its HSV ranges."""

    name: str
    superclass: str
    horizon: tuple[float, float]  # (min, max) fraction of the image height
    textured: str
    textures: tuple[str, ...]
    upper: Tint
    lower: Tint


SCENES: tuple[Scene, ...] = (
    Scene("street", "urban", (0.35, 0.5), "lower", ("gravel", "noise", "brick", "marble"),
          _SKY, ((0, 360), (0.0, 0.08), (0.35, 0.6))),
    Scene("room", "urban", (0.55, 0.7), "upper", ("stripes", "dots", "diamonds", "plaid"),
          ((20, 60), (0.2, 0.45), (0.6, 0.85)), ((15, 35), (0.35, 0.55), (0.3, 0.5))),
    Scene("kitchen", "urban", (0.5, 0.65), "upper", ("checker", "grid", "perforated", "woven"),
          ((150, 200), (0.15, 0.35), (0.65, 0.9)), ((0, 360), (0.02, 0.12), (0.5, 0.7))),
    Scene("park", "nature", (0.3, 0.45), "lower", ("grass", "flecks", "blotches", "scales"),
          _SKY, ((85, 130), (0.35, 0.6), (0.4, 0.65))),
    Scene("harbour", "nature", (0.35, 0.5), "lower", ("waves", "rings", "zigzag", "lines"),
          _SKY, ((195, 230), (0.4, 0.65), (0.35, 0.6))),
    Scene("field", "nature", (0.3, 0.45), "lower", ("bands", "crosshatch", "grain", "polka"),
          _SKY, ((30, 55), (0.4, 0.65), (0.5, 0.75))),
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


# The class design: key object types t0..t5 and scenes s0..s5 in the orders below; scene s hosts the
# key types s, s+1, s+2 (mod 6) and the rule colour of type t in scene s is KEY_COLOURS[(2t - s) mod 6].
# Each scene hosts 3 classes, each key type is the key of 3 classes (3 scenes, 3 colours), each key
# colour is the colour of 3 classes (3 scenes, 3 types), and the 3 classes of a scene differ in both
# type and colour. Written out below; `_check_design` verifies these counts at import.
KEY_PARTS = {"car": "body", "lamp": "shade", "person": "torso", "bird": "body", "flower": "petal", "umbrella": "canopy"}
CLASS_RULES: tuple[ClassRule, ...] = (
    ClassRule("red car in street", "street", "car", "body", colour="red"),
    ClassRule("yellow lamp in street", "street", "lamp", "shade", colour="yellow"),
    ClassRule("purple-shirted person in street", "street", "person", "torso", colour="purple"),
    ClassRule("blue lamp in room", "room", "lamp", "shade", colour="blue"),
    ClassRule("green-shirted person in room", "room", "person", "torso", colour="green"),
    ClassRule("orange bird in room", "room", "bird", "body", colour="orange"),
    ClassRule("yellow-shirted person in kitchen", "kitchen", "person", "torso", colour="yellow"),
    ClassRule("purple bird in kitchen", "kitchen", "bird", "body", colour="purple"),
    ClassRule("red flower in kitchen", "kitchen", "flower", "petal", colour="red"),
    ClassRule("green bird in park", "park", "bird", "body", colour="green"),
    ClassRule("orange flower in park", "park", "flower", "petal", colour="orange"),
    ClassRule("blue umbrella in park", "park", "umbrella", "canopy", colour="blue"),
    ClassRule("purple flower in harbour", "harbour", "flower", "petal", colour="purple"),
    ClassRule("red umbrella in harbour", "harbour", "umbrella", "canopy", colour="red"),
    ClassRule("yellow car in harbour", "harbour", "car", "body", colour="yellow"),
    ClassRule("orange umbrella in field", "field", "umbrella", "canopy", colour="orange"),
    ClassRule("blue car in field", "field", "car", "body", colour="blue"),
    ClassRule("green lamp in field", "field", "lamp", "shade", colour="green"),
)
RULES_BY_SCENE = {s.name: tuple(r for r in CLASS_RULES if r.scene == s.name) for s in SCENES}
KEY_TYPES = tuple(KEY_PARTS)
DISTRACTOR_TYPES = tuple(o.name for o in OBJECTS if o.name not in KEY_PARTS)  # the types of no rule


def _check_design() -> None:
    types, scenes = list(KEY_TYPES), [s.name for s in SCENES]
    expected = {(scenes[s], types[(s + d) % 6], KEY_COLOURS[(2 * ((s + d) % 6) - s) % 6]) for s in range(6) for d in range(3)}
    actual = {(r.scene, r.object, r.colour) for r in CLASS_RULES}
    if actual != expected or len(CLASS_RULES) != 18 or any(KEY_PARTS[r.object] != r.part for r in CLASS_RULES):
        raise AssertionError("CLASS_RULES do not follow the cyclic design described above them")
    for rule in CLASS_RULES:
        if rule.colour not in STYLES[next(p.style_name for p in OBJECT_BY_NAME[rule.object].pieces if p.part == rule.part)].colours:
            raise AssertionError(f"{rule.name}: the key part's palette lacks {rule.colour}")


_check_design()


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


