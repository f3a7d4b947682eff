"""ConceptWorld: a deterministic generator of images with exact concept annotations in Broden's format.

Two presets (`WorldConfig.preset`):

- `"classification"` (ConceptWorld v2): six scenes (street, room, kitchen: urban; park, harbour,
  field: nature), eleven object types drawn from named parts, painted in the 11 named colours, palette
  patterns and scikit-image's texture photographs; parts map to materials. 18 classes, each a
  conjunction "scene AND key object type whose key part has a key colour" (`CLASS_RULES`): every
  scene hosts 3 classes, each of the 6 key object types (car, lamp, person, bird, flower, umbrella)
  is the key of 3 classes (in 3 scenes, with 3 colours) and each of the 6 key colours (red, blue,
  yellow, green, purple, orange) is the colour of 3 classes. An image holds its key object, with
  probability `confuser_rate` a confuser (another key type of its scene whose key part wears another
  rule colour of the scene, so it satisfies no rule) and `distractors` objects of the five types of
  no rule (house, boat, bicycle, tree, bench; the same pool in every scene); free parts are then
  repainted in the key colours the image lacks, so that most images show all six. Scene alone, the
  set of object types alone or the set of colours alone cannot decide the class: `cue_bounds`
  measures the best rule of each such single cue (at most about one third on a default-size world;
  scene and object set together about 0.55-0.6, since a confuser is absent in 20% of the images).
  The class is a function of the labels (Bayes accuracy 100%). Superclasses: urban, nature (the
  scene's group). Objects: bounding box 8-16% of the image (`object_area`).
- `"cgl_shapes"`: CGL's synthetic task (spec 03, section 5): two non-overlapping shapes from
  {square, circle, triangle}, each red, green or blue; label "a square is present" (`cgl_task =
  "binary"`) or the unordered pair of colour-shapes (`"combination"`, 45 classes). Its 15 concepts
  are stored as color (3 colours), object (3 shapes) and part (9 colour-shapes, each a part of its
  shape, so a shape's mask is the union of its colour-shape masks). Flat fills, no dither by default.

On disk (`generate_world`): `index.csv`, `label.csv`, `category.csv`, `c_<category>.csv` and
`images/` exactly as Broden (spec `network_dissection_and_broden.md` section 3.2; images are PNG so
colour masks are exact; masks are R + 256·G label PNGs at `mask_size`), plus `tasks.csv`,
`classes.json`, `concept_tree.json`, `instances.csv` (visible box of every object and part
instance, for concept image sets; role key, confuser or distractor), `evidence/` (per image, 255 on
the pixels of the object that makes its class) and `world.json`.

Annotation rules:
- Label numbers are assigned in blocks of 100 per category (color 1.., object 101.., part 201..,
  material 301.., scene 401.., texture 501..), so the numbering of one category never shifts when
  another grows; the numbers between blocks are unused. Material numbers above 255 exercise the G
  channel of the mask encoding. "brick" is both a material (brick-photo walls) and a texture (an
  image whose brick-painted area passes `texture_min_fraction`), the label in two categories.
- Mask pixel (i, j) carries the labels of the image pixel under its centre,
  (floor((i + ½)·ih/sh), floor((j + ½)·iw/sw)) (nearest down-sampling of the painted records), so
  every labelled colour-mask pixel holds a shade of that colour in the image there, up to the
  dither (`WorldConfig.dither`, at most that many levels per channel).
- Colour labels mark object parts only: backgrounds are painted in tints off the palette (gradients,
  tinted patterns, noise, photographs), so a colour concept is "an object part painted in this colour".
- Part plane 1 holds object parts, plane 2 sub-parts (wheel → tire, hub; head → face, hair).
  An object's mask is the union of its parts; a material's mask the union of the parts painted
  in it. Backgrounds carry no object, part or material label.
- Texture labels of an image: the textures painted on at least `texture_min_fraction` of its
  pixels, largest first. Every scene paints one of its two bands (sky, ground, wall or floor) with
  one of its four textures (24 textures, each in one scene, balanced over the scene's images) and
  the other band as a smooth gradient (texture "plain"). Scene: one label per image.
- Concepts whose IoU ceiling is low by design (`CAPPED_BY_DESIGN`): the six scenes (a scene label
  covers its whole image) and the texture "plain" (in nearly every image); `concept_coverage` marks
  them so that summaries can leave them out.
"""
from __future__ import annotations

import colorsys
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
import pandas as pd

from replication import cache, io, paths
from replication.data.broden import CATEGORIES, decode_label_mask, encode_label_mask
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
_P, _S, _D, _C, _N, _W = "plain", "stripes", "dots", "checker", "noise", "wood"  # wood: brown "grain" pattern
STYLES: dict[str, Style] = {
    # key parts (the part of a class rule): plain in the rule colour when they make or confuse a
    # class, so their palettes hold all six key colours
    "car_body": Style(((_P, "metal"),), (*KEY_COLOURS, "white", "black", "gray")),
    "shade": Style(((_P, "fabric"), (_P, "glass")), (*KEY_COLOURS, "white")),
    "torso": Style(((_P, "fabric"), (_S, "fabric"), (_C, "fabric"), (_D, "fabric")), (*KEY_COLOURS, "white", "black")),
    "bird_body": Style(((_P, None), (_N, None)), (*KEY_COLOURS, "brown", "black", "white")),
    "petal": Style(((_P, None), (_D, None)), (*KEY_COLOURS, "pink", "white")),
    "canopy": Style(((_P, "fabric"), (_S, "fabric")), (*KEY_COLOURS, "pink", "black", "white")),
    # other parts; the palettes of most hold the six key colours too (see `_spread_key_colours`)
    "wall": Style(((_P, None), (_S, None), ("photo:brick", "brick"), (_W, "wood")),
                  (*KEY_COLOURS, "white", "pink", "gray")),
    "roof": Style(((_P, None), (_C, None)), (*KEY_COLOURS, "brown", "gray", "black")),
    "door": Style(((_W, "wood"), (_P, "wood")), (*KEY_COLOURS, "brown", "black")),
    "window": Style(((_P, "glass"),), ("blue", "white")),
    "trunk": Style(((_P, "wood"), (_W, "wood")), ("brown",)),
    "crown": Style(((_P, "foliage"), (_D, "foliage"), (_N, "foliage")), ("green", "orange", "yellow", "red")),
    "tire": Style(((_P, "rubber"),), ("black",), (0,)),
    "hub": Style(((_P, "metal"),), ("gray", "white", "yellow")),
    "hull": Style(((_P, "wood"), (_W, "wood"), (_S, "wood"), (_P, "metal")), (*KEY_COLOURS, "white", "brown", "black")),
    "sail": Style(((_P, "fabric"), (_S, "fabric")), (*KEY_COLOURS, "white")),
    "stem": Style(((_P, "foliage"),), ("green",)),
    "face": Style(((_P, "skin"),), ("pink", "orange", "brown"), (1,)),
    "hair": Style(((_P, None),), ("black", "brown", "yellow", "orange")),
    "person_leg": Style(((_P, "fabric"), (_S, "fabric")), (*KEY_COLOURS, "black", "gray", "brown")),
    "pole": Style(((_P, "metal"), (_P, "wood"), (_S, "metal")), (*KEY_COLOURS, "gray", "black")),
    "frame": Style(((_P, "metal"), (_S, "metal")), (*KEY_COLOURS, "black")),
    "wing": Style(((_P, None), (_S, None)), (*KEY_COLOURS, "brown", "black", "white", "gray")),
    "seat": Style(((_W, "wood"), (_P, "wood"), (_S, "wood"), (_P, "metal")), (*KEY_COLOURS, "brown")),
    "bench_leg": Style(((_P, "metal"),), (*KEY_COLOURS, "black", "gray")),
    "handle": Style(((_P, "metal"), (_P, "wood"), (_W, "wood")), (*KEY_COLOURS, "black", "gray", "brown")),
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


# ============================================================================ sampling
@dataclass
class PartFill:
    fill: Fill
    material: str | None


PATTERN_FINISHES = (_S, _D, _C)


def sample_fill(style: Style, rng: np.random.Generator, image_size: int, *, colour: str | None = None,
                material: str | None = None, pair: tuple[str, str] | None = None) -> PartFill:
    """A random finish of `style`; `colour` forces a plain fill of that colour, `pair` a two-colour
    pattern of these colours (the style must have a pattern finish), `material` a finish of it."""
    finishes = [f for f in style.finishes if material is None or f[1] == material]
    if colour is not None:
        finishes = [f for f in finishes if f[0] == _P] or [(_P, style.finishes[0][1])]
    if pair is not None:
        finishes = [f for f in finishes if f[0] in PATTERN_FINISHES]
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
        return PartFill(Fill("grain", ("brown", "brown"), (0, 1), period=2 * scale + int(rng.integers(0, 2)),
                             axis=int(rng.integers(0, 2)), offset=offset), mat)
    if kind.startswith("photo:"):
        return PartFill(Fill("photo", photo=kind.split(":", 1)[1], offset=offset), mat)
    if kind == _N:
        name = style.colours[rng.integers(len(style.colours))]
        base = tuple(int(v) for v in PALETTE[name][shade()])
        return PartFill(Fill("noise", base=base, offset=offset), mat)
    # two-colour pattern: two distinct (colour, shade) pairs
    if pair is not None:
        (c1, c2), (s1, s2) = pair, (shade(), shade())
    else:
        pairs = [(c, s) for c in style.colours for s in style.shades]
        if len(pairs) < 2:
            pairs = [(c, s) for c in style.colours for s in (0, 1)]
        first, second = rng.choice(len(pairs), size=2, replace=False)
        (c1, s1), (c2, s2) = pairs[first], pairs[second]
    period = scale * int(rng.integers(3, 6))
    return PartFill(Fill(kind, (c1, c2), (s1, s2), period=period, axis=int(rng.integers(0, 3)), offset=offset), mat)


def _tint(ranges: Tint, rng: np.random.Generator) -> tuple[float, float, float]:
    (h0, h1), (s0, s1), (v0, v1) = ranges
    return (float(rng.uniform(h0, h1)) % 360, float(rng.uniform(s0, s1)), float(rng.uniform(v0, v1)))


def _rgb(hsv: tuple[float, float, float]) -> tuple[int, int, int]:
    h, s, v = hsv
    r, g, b = colorsys.hsv_to_rgb(h / 360, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def background_fill(scene: Scene, band: str, rng: np.random.Generator, image_size: int,
                    texture: int | None = None) -> Fill:
    """The fill of one band ("upper" or "lower") of `scene`: its texture number `texture` (None: one
    at random) in two tints of the band's ranges on the textured band, a smooth vertical gradient
    between two tints on the other."""
    h, s, v = _tint(scene.upper if band == "upper" else scene.lower, rng)
    offset = (int(rng.integers(0, 512)), int(rng.integers(0, 512)))
    if band != scene.textured:
        step = float(rng.uniform(-0.12, 0.12))
        return Fill("gradient", tints=(_rgb((h, s, v)), _rgb((h, s * 0.8, v + step))))
    name = scene.textures[rng.integers(len(scene.textures)) if texture is None else texture]
    if name in PHOTOS:
        return Fill("photo", photo=name, offset=offset, tints=(_rgb((h, s, 0.75 * v)),))
    if name == "noise":
        return Fill("noise", base=_rgb((h, s, v)), offset=offset)
    contrast = float(rng.uniform(0.18, 0.3))
    second = (h, s, v - contrast) if v > 0.5 else (h, s, v + contrast)
    scale = max(1, image_size // 32)
    return Fill("tinted", pattern=name, tints=(_rgb((h, s, v)), _rgb(second)), period=scale * int(rng.integers(3, 6)),
                axis=int(rng.integers(0, 3)), offset=offset)


@dataclass
class Instance:
    """An object to draw: type, bounding box (x, y, w, h in pixels), a fill per style, role."""

    kind: ObjectType
    box: tuple[float, float, float, float]
    fills: dict[str, PartFill]
    role: str  # "key" (makes the class), "confuser" or "distractor"

    @property
    def key(self) -> bool:
        return self.role == "key"


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


def _overlap(a: tuple, b: tuple) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def _place(kind: ObjectType, rng, size: int, horizon: float, config: WorldConfig, taken: list[tuple]) -> tuple:
    """A bounding box (x, y, w, h) for `kind`: area from `object_area`, standing below the horizon
    (birds anywhere), overlapping each box in `taken` by at most 10% of the smaller (30 tries, then
    the last try)."""
    for _ in range(30):
        area = rng.uniform(*config.object_area) * size * size
        height = min(np.sqrt(area / kind.aspect), size * 0.95)
        width = min(height * kind.aspect, size * 0.95)
        x = rng.uniform(0, size - width)
        if kind.placement == "any":
            y = rng.uniform(0, size - height)
        else:
            low = min(max(horizon + 0.25 * height, height), size)
            y = rng.uniform(low, size) - height
        box = (x, y, width, height)
        if all(_overlap(box, other) <= 0.1 * min(width * height, other[2] * other[3]) for other in taken):
            break
    return box


def _sample_fills(kind: ObjectType, rng, size: int, forced_part: str | None, colour: str | None,
                  avoid: Sequence[ClassRule]) -> dict[str, PartFill]:
    """A fill per style of `kind`: `forced_part` plain in `colour`, the others random, resampled
    until the object satisfies none of the rules in `avoid`."""
    fills: dict[str, PartFill] = {}
    forced_styles = {p.style_name for p in kind.pieces if p.part == forced_part}
    for piece in kind.pieces:
        name = piece.style_name
        if name not in fills:
            fills[name] = sample_fill(STYLES[name], rng, size, colour=colour if name in forced_styles else None)
    probe = Instance(kind, (0, 0, 1, 1), fills, "distractor")
    for _ in range(100):  # resample the styles that make a rule of this scene true
        offending = [r for r in avoid if satisfies(r, probe)]
        if not offending:
            return fills
        for rule in offending:
            for piece in kind.pieces:
                if piece.part == rule.part and piece.style_name not in forced_styles:
                    fills[piece.style_name] = sample_fill(STYLES[piece.style_name], rng, size)
            if all(p.style_name in forced_styles for p in kind.pieces if p.part == rule.part):
                raise RuntimeError(f"a {kind.name} forced to {colour} satisfies {rule.name!r}; the class design is inconsistent.")
    raise RuntimeError(f"could not draw a {kind.name} that avoids rules {[r.name for r in avoid]}; widen the styles' colours.")


def _spread_key_colours(instances: list[Instance], avoid: Sequence[ClassRule], rng, size: int) -> None:
    """Repaint free parts in the key colours an image lacks, so that (parts allowing, occlusion aside)
    every image shows all six key colours and the set of colours present says little about the class.

    A free part is any part but a key or confuser's key part, whose palette holds a missing colour and
    which is not the only carrier of a key colour. Free parts are taken in random order; one is painted
    plain in a missing colour, or in a two-colour pattern of two missing ones when its style has a
    pattern finish. A repainting that would satisfy a rule of `avoid` is undone."""
    present: dict[str, int] = {}
    for instance in instances:
        for painted in instance.fills.values():
            for colour in painted.fill.named_colours:
                present[colour] = present.get(colour, 0) + 1
    missing = [c for c in KEY_COLOURS if c not in present]
    missing = [missing[i] for i in rng.permutation(len(missing))]
    free = [(instance, name) for instance in instances for name in instance.fills
            if instance.role == "distractor" or name not in
            {p.style_name for p in instance.kind.pieces if p.part == KEY_PARTS.get(instance.kind.name)}]
    for choice in rng.permutation(len(free)):
        if not missing:
            return
        instance, name = free[choice]
        style, before = STYLES[name], instance.fills[name]
        wanted = [c for c in missing if c in style.colours]
        if not wanted or any(present.get(c, 0) == 1 for c in before.fill.named_colours if c in KEY_COLOURS):
            continue
        if len(wanted) >= 2 and any(kind in PATTERN_FINISHES for kind, _ in style.finishes):
            wanted = wanted[:2]
            instance.fills[name] = sample_fill(style, rng, size, pair=(wanted[0], wanted[1]))
        else:
            wanted = wanted[:1]
            instance.fills[name] = sample_fill(style, rng, size, colour=wanted[0])
        if any(satisfies(r, instance) for r in avoid if r.object == instance.kind.name):
            instance.fills[name] = before
            continue
        for colour in before.fill.named_colours:
            present[colour] -= 1
        for colour in instance.fills[name].fill.named_colours:
            present[colour] = present.get(colour, 0) + 1
        missing = [c for c in missing if c not in wanted]


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


def _draw(rendered: Rendered, instance: Instance, cat: Catalogue, rng) -> dict[str, list[int]]:
    """Rasterise every piece of `instance`; pieces of one (part, sub-part, style) share a region id.
    Returns the region ids of each part."""
    canvas = rendered.canvas
    rows, cols, u, v = box_window(instance.box, canvas.size)
    number = len(rendered.instances)
    rendered.instances.append((instance.kind.name, instance.role))
    regions: dict[tuple, int] = {}
    parts: dict[str, list[int]] = {}
    for piece in instance.kind.pieces:
        signature = (piece.part, piece.subpart, piece.style_name)
        if signature not in regions:
            regions[signature] = len(rendered.region_object)
            parts.setdefault(piece.part, []).append(regions[signature])
            painted = instance.fills[piece.style_name]
            rendered.region_object.append(cat.number("object", instance.kind.name))
            rendered.region_part.append(cat.number("part", piece.part))
            rendered.region_subpart.append(cat.number("part", piece.subpart) if piece.subpart else 0)
            rendered.region_material.append(cat.number("material", painted.material) if painted.material else 0)
            rendered.region_key.append(instance.key)
            rendered.region_instance.append(number)
        mask = shape_mask(piece.shape, u, v, instance.box[2], instance.box[3])
        canvas.paint(rows, cols, mask, instance.fills[piece.style_name].fill, regions[signature], rng)
    return parts


def _compose(config: WorldConfig, class_id: int, scene: Scene, horizon: int, bands: tuple[Fill, Fill],
             instances: list[Instance], key_part: str, cat: Catalogue, rng) -> tuple[Rendered, bool]:
    """Paint the bands and the instances in order; also say whether the key object's key part shows
    on at least half of the pixels it would cover alone, and at mask resolution."""
    size = config.image_size
    rendered = _new_rendered(size, class_id, scene.name)
    rendered.canvas.fill_rows(0, horizon, bands[0], rng)
    rendered.canvas.fill_rows(horizon, size, bands[1], rng)
    key_regions: list[int] = []
    for instance in instances:
        parts = _draw(rendered, instance, cat, rng)
        if instance.key:
            key_regions = parts.get(key_part, [])
            alone = int(np.isin(rendered.canvas.region, key_regions).sum())
    region = rendered.canvas.region
    shown = np.isin(region, key_regions)
    positions = sample_positions(size, config.mask_size)
    visible = shown.sum() >= 0.5 * alone and shown[np.ix_(positions, positions)].any()
    return rendered, bool(visible)


def render_classification(config: WorldConfig, class_id: int, rng: np.random.Generator, cat: Catalogue,
                          texture: int | None = None) -> Rendered:
    """One image of class `class_id`: the scene's bands (its texture number `texture`, None: at random),
    then its key object, maybe a confuser and distractors, placed and drawn in random order.

    The class must follow from the labels, so the key part must show at mask resolution: if it does
    not, the objects are drawn again with the key object on top, and if it still does not (a tiny
    mask), the objects are drawn anew (up to 20 times)."""
    rule = CLASS_RULES[class_id]
    scene = SCENE_BY_NAME[rule.scene]
    size = config.image_size
    horizon = int(round(rng.uniform(*scene.horizon) * size))
    bands = (background_fill(scene, "upper", rng, size, texture), background_fill(scene, "lower", rng, size, texture))
    scene_rules = RULES_BY_SCENE[scene.name]
    for _attempt in range(20):
        plan = [(rule.object, rule.part, rule.colour, "key")]
        if rng.random() < config.confuser_rate:
            others = [r for r in scene_rules if r is not rule]
            confuser = others[rng.integers(len(others))]
            wrong = [r.colour for r in scene_rules if r is not confuser]  # another rule colour of the scene
            plan.append((confuser.object, confuser.part, wrong[rng.integers(len(wrong))], "confuser"))
        for _ in range(int(rng.integers(config.distractors[0], config.distractors[1] + 1))):
            plan.append((DISTRACTOR_TYPES[rng.integers(len(DISTRACTOR_TYPES))], None, None, "distractor"))
        instances, boxes = [], []
        for i in rng.permutation(len(plan)):
            name, part, colour, role = plan[i]
            kind = OBJECT_BY_NAME[name]
            boxes.append(_place(kind, rng, size, horizon, config, boxes))
            avoid = [r for r in scene_rules if r is not rule] if role == "key" else scene_rules
            instances.append(Instance(kind, boxes[-1], _sample_fills(kind, rng, size, part, colour, avoid), role))
        _spread_key_colours(instances, [r for r in scene_rules if r is not rule], rng, size)
        rendered, visible = _compose(config, class_id, scene, horizon, bands, instances, rule.part, cat, rng)
        if not visible:
            on_top = [i for i in instances if not i.key] + [i for i in instances if i.key]
            rendered, visible = _compose(config, class_id, scene, horizon, bands, on_top, rule.part, cat, rng)
        if visible:
            return rendered
    raise RuntimeError(f"the key part of a {rule.object} does not show at mask size {config.mask_size} in 20 draws; "
                       "raise image_size, mask_size or object_area.")


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


def _write_image(config: WorldConfig, out: Path, index: int, split: str, class_id: int, texture: int = 0) -> dict:
    """Render image `index` with its own seed, write its PNGs, return its index/task/statistics record."""
    cat = catalogue(config.preset)
    rng = np.random.default_rng([config.seed, index])
    if config.preset == "cgl_shapes":
        rendered = render_cgl(config, rng, cat)
    else:
        rendered = render_classification(config, class_id, rng, cat, texture)
    canvas = rendered.canvas
    canvas.dither(config.dither, rng)  # records untouched; no draw from rng when dither is 0
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
    return [_write_image(config, Path(out), index, split, class_id, texture) for index, split, class_id, texture in items]


# ============================================================================ the dataset
def _assignments(config: WorldConfig) -> tuple[list[str], list[int], list[int]]:
    """Split per image (exactly round(val_fraction·n) val images), balanced class ids and, per scene,
    balanced texture numbers (each of a scene's textures in as many of its images as possible, so
    texture frequencies, hence their IoU ceilings, do not scatter), seeded."""
    rng = np.random.default_rng([config.seed, 2**31 - 1])
    n = config.n_images
    splits = np.full(n, "train", dtype=object)
    splits[rng.permutation(n)[: int(round(config.val_fraction * n))]] = "val"
    classes = rng.permutation(np.arange(n) % len(CLASS_RULES))
    textures = np.zeros(n, dtype=np.int64)
    if config.preset == "classification":
        scene_of = np.array([SCENES.index(SCENE_BY_NAME[r.scene]) for r in CLASS_RULES])[classes]
        for number, scene in enumerate(SCENES):
            members = np.flatnonzero(scene_of == number)
            textures[members] = rng.permutation(np.arange(len(members)) % len(scene.textures))
    return splits.tolist(), classes.tolist(), textures.tolist()


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
                          "class rule holds for every image (confusers and distractors are drawn so as to satisfy none)",
        "design": "scene s hosts key types s, s+1, s+2 (mod 6) of key_types, with rule colour "
                  "key_colours[(2t - s) mod 6] for type t: 3 classes per scene, per key type and per key colour",
        "scenes": [s.name for s in SCENES], "key_types": list(KEY_TYPES), "key_parts": dict(KEY_PARTS),
        "key_colours": list(KEY_COLOURS), "distractor_types": list(DISTRACTOR_TYPES),
        "confuser_rate": config.confuser_rate, "distractors": list(config.distractors),
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
        splits, classes, textures = _assignments(config)
        items = list(zip(range(config.n_images), splits, classes, textures))
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


# Concepts whose IoU ceiling is low by design, with the reason: summaries of detector counts or
# ceilings ("unique detectors over all categories") should leave them out.
CAPPED_BY_DESIGN: dict[tuple[str, str], str] = {
    **{("scene", s.name): f"a scene label covers its whole image: coverage = share of images (1/{len(SCENES)}), "
                          f"ceiling about 0.005·{len(SCENES)}" for s in SCENES},
    ("texture", "plain"): "untextured: the smooth band (sky, floor) of nearly every image and most object parts are "
                          "plain, so its image-level label covers nearly every image",
}
# The IoU ceilings the classification preset is built to reach at the top-0.5% quantile rule
# (concepts of CAPPED_BY_DESIGN aside).
IOU_CEILING_TARGETS = {"object": 0.2, "part": 0.2, "color": 0.1, "material": 0.1, "scene": 0.1, "texture": 0.1}


def concept_coverage(root: str | os.PathLike, quantile: float = 0.005):
    """Per (category, concept): images, coverage as a fraction of all mask pixels, its IoU ceiling and
    `capped_by_design` (the reason from `CAPPED_BY_DESIGN`, "" for every other concept)."""
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
    preset = io.read_json(root / "classes.json").get("preset") if (root / "classes.json").is_file() else None
    capped = CAPPED_BY_DESIGN if preset == "classification" else {}
    frame["capped_by_design"] = [capped.get((c, n), "") for c, n in zip(frame["category"], frame["concept"])]
    return frame


CUE_FAMILIES = ("scene", "object set", "colour set")


def image_cues(root: str | os.PathLike) -> pd.DataFrame:
    """Per image of a ConceptWorld, from its own label files: split, class_id, and the cues a single-cue
    rule may use: `scene` (scene name, "" if none), `object set` and `colour set` (the sorted names of
    the objects and colours present in its object and colour masks, joined by "+")."""
    from PIL import Image

    root = Path(root)
    index = pd.read_csv(root / "index.csv", keep_default_na=False, dtype=str)
    tasks = pd.read_csv(root / "tasks.csv")
    names = pd.read_csv(root / "label.csv", keep_default_na=False).set_index("number")["name"]

    def present(file: str) -> str:
        if not file:
            return ""
        with Image.open(root / "images" / file) as opened:
            labels = decode_label_mask(np.asarray(opened.convert("RGB")))
        return "+".join(sorted(names[int(n)] for n in np.unique(labels[labels > 0])))

    scenes = [names[int(cell.split(";")[0])] if cell else "" for cell in index["scene"]]
    return pd.DataFrame({"image": index["image"], "split": index["split"], "class_id": tasks["class_id"].to_numpy(),
                         "scene": scenes, "object set": [present(f) for f in index["object"]],
                         "colour set": [present(f) for f in index["color"]]})


def cue_bounds(root: str | os.PathLike, *, pairs: bool = False, cues: pd.DataFrame | None = None) -> pd.DataFrame:
    """Best accuracy of a rule that sees a single cue family: the scene label, the set of object types
    present, or the set of colours present (`image_cues`, from the world's own labels).

    The rule maps each cue value to one class: the most frequent class of that value on the train split
    (ties: lowest class id; a value never seen in train gets train's most frequent class). Columns:
    `val_accuracy`: that rule scored on the val split, the number the task is built to keep <= 0.40
    (ConceptWorld v2); `val_fit_accuracy`: the rule fitted on val itself and scored there, an upper
    bound that rewards rare values (a value seen once is always right); `train_accuracy`; `values`:
    distinct cue values in train; `majority`: the share of val's most frequent class. `pairs=True`
    adds the pairs of families (information only: two cues together may well decide more).
    """
    cues = image_cues(root) if cues is None else cues
    families = [f for f in CUE_FAMILIES if cues[f].astype(bool).any()]
    combos = [(f,) for f in families]
    if pairs:
        combos += [(a, b) for i, a in enumerate(families) for b in families[i + 1:]]
    train, val = cues[cues["split"] == "train"], cues[cues["split"] == "val"]
    if train.empty or val.empty:
        raise ValueError(f"cue_bounds needs train and val images in {root}; regenerate the world with 0 < val_fraction.")
    fallback = int(train["class_id"].value_counts().sort_index().idxmax())

    def fit(frame: pd.DataFrame, key: pd.Series) -> dict:
        counts = pd.crosstab(key, frame["class_id"])
        return {value: int(row.idxmax()) for value, row in counts.iterrows()}  # idxmax: first (lowest id) of ties

    def score(rule: dict, frame: pd.DataFrame, key: pd.Series) -> float:
        return float((key.map(lambda v: rule.get(v, fallback)).to_numpy() == frame["class_id"].to_numpy()).mean())

    rows = []
    for combo in combos:
        key_train = train[list(combo)].astype(str).agg(" | ".join, axis=1)
        key_val = val[list(combo)].astype(str).agg(" | ".join, axis=1)
        rule, rule_val = fit(train, key_train), fit(val, key_val)
        rows.append({"cue": " + ".join(combo), "values": len(rule), "val_accuracy": score(rule, val, key_val),
                     "val_fit_accuracy": score(rule_val, val, key_val), "train_accuracy": score(rule, train, key_train),
                     "majority": float(val["class_id"].value_counts(normalize=True).max())})
    return pd.DataFrame(rows)


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
    "concept_coverage", "concept_image_sets", "image_cues", "cue_bounds", "CLASS_RULES", "OBJECTS", "SCENES",
    "MATERIALS", "PRESETS", "KEY_COLOURS", "KEY_TYPES", "KEY_PARTS", "DISTRACTOR_TYPES", "CAPPED_BY_DESIGN",
    "IOU_CEILING_TARGETS", "CUE_FAMILIES", "sample_positions",
]

