"""ConceptWorld's rendering: fills, object placement and the composition of one image with its
label records (`render_classification`, `render_cgl`), from the design in `world_design`."""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from replication.data.drawing import PALETTE, PHOTOS, Canvas, Fill, box_window, shape_mask
from replication.data.world_design import (
    CGL_COLOURS,
    CGL_COMBOS,
    CGL_SHAPES,
    CHECKER,
    CLASS_RULES,
    DISTRACTOR_TYPES,
    DOTS,
    KEY_COLOURS,
    KEY_PARTS,
    NOISE,
    OBJECT_BY_NAME,
    PLAIN,
    RULES_BY_SCENE,
    SCENE_BY_NAME,
    STRIPES,
    STYLES,
    WOOD,
    Catalogue,
    ClassRule,
    ObjectType,
    Scene,
    Style,
    Tint,
    WorldConfig,
)


# ============================================================================ sampling
@dataclass
class PartFill:
    fill: Fill
    material: str | None


PATTERN_FINISHES = (STRIPES, DOTS, CHECKER)


def sample_fill(style: Style, rng: np.random.Generator, image_size: int, *, colour: str | None = None,
                material: str | None = None, pair: tuple[str, str] | None = None) -> PartFill:
    """A random finish of `style`; `colour` forces a plain fill of that colour, `pair` a two-colour
    pattern of these colours (the style must have a pattern finish), `material` a finish of it."""
    finishes = [f for f in style.finishes if material is None or f[1] == material]
    if colour is not None:
        finishes = [f for f in finishes if f[0] == PLAIN] or [(PLAIN, style.finishes[0][1])]
    if pair is not None:
        finishes = [f for f in finishes if f[0] in PATTERN_FINISHES]
    if not finishes:
        raise ValueError(f"style has no finish of material {material!r}")
    kind, mat = finishes[rng.integers(len(finishes))]
    scale = max(1, image_size // 32)
    offset = (int(rng.integers(0, 512)), int(rng.integers(0, 512)))

    def shade() -> int:
        return int(style.shades[rng.integers(len(style.shades))])
    if kind == PLAIN:
        name = colour or style.colours[rng.integers(len(style.colours))]
        return PartFill(Fill("plain", (name,), (shade(),)), mat)
    if kind == WOOD:
        return PartFill(Fill("grain", ("brown", "brown"), (0, 1), period=2 * scale + int(rng.integers(0, 2)),
                             axis=int(rng.integers(0, 2)), offset=offset), mat)
    if kind.startswith("photo:"):
        return PartFill(Fill("photo", photo=kind.split(":", 1)[1], offset=offset), mat)
    if kind == NOISE:
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


def sample_positions(image: int, mask: int) -> np.ndarray:
    """Image row (or column) under the centre of each mask row: floor((i + ½)·image/mask)."""
    return ((np.arange(mask) + 0.5) * image / mask).astype(np.intp)
