"""ConceptWorld: a deterministic generator of images with exact concept annotations in Broden's format.

This module writes a world; its design (`WorldConfig`, the catalogue and class rules) lives in
`world_design`, the drawing of one image in `world_render`, and reading a world back (coverage, IoU
ceilings, cue bounds, concept image sets) in `world_statistics`; their public names are re-exported here.

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

import csv
import hashlib
import io as _io
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from replication import cache, io, paths
from replication.data.broden import CATEGORIES, encode_label_mask
from replication.data.drawing import PHOTOS, TEXTURE_NAMES, encode_png, photo_tile
from replication.runtime import progress
from replication.data.world_design import (
    CGL_COLOURS,
    CGL_COMBOS,
    CGL_SHAPES,
    CLASS_RULES,
    DISTRACTOR_TYPES,
    GENERATOR_VERSION,
    INDEX_HEADER,
    INSTANCE_HEADER,
    KEY_COLOURS,
    KEY_PARTS,
    KEY_TYPES,
    MATERIALS,
    OBJECTS,
    PNG_COMPRESS_LEVEL,
    PRESETS,
    SCENE_BY_NAME,
    SCENES,
    TASK_HEADER,
    Catalogue,
    WorldConfig,
    catalogue,
)
from replication.data.world_render import (
    Rendered,
    cgl_classes,
    render_cgl,
    render_classification,
    sample_positions,
)
from replication.data.world_statistics import (
    CAPPED_BY_DESIGN,
    CUE_FAMILIES,
    IOU_CEILING_TARGETS,
    concept_coverage,
    concept_image_sets,
    cue_bounds,
    image_cues,
    iou_ceiling,
)


GENERATOR_FILES = ("concept_world.py", "world_design.py", "world_render.py", "drawing.py")  # hashed into cache keys

# ============================================================================ writing one image
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
    """Version and source hash of the generator (`GENERATOR_FILES`): any change to them gives new cache
    keys, so a cached world (and every model trained on it) is never silently stale."""
    digest = hashlib.sha256()
    for name in GENERATOR_FILES:
        digest.update(Path(__file__).with_name(name).read_bytes())
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


__all__ = [
    "WorldConfig", "generate_world", "ensure_world", "world_dir", "catalogue", "concept_tree", "iou_ceiling",
    "concept_coverage", "concept_image_sets", "image_cues", "cue_bounds", "CLASS_RULES", "OBJECTS", "SCENES",
    "MATERIALS", "PRESETS", "KEY_COLOURS", "KEY_TYPES", "KEY_PARTS", "DISTRACTOR_TYPES", "CAPPED_BY_DESIGN",
    "IOU_CEILING_TARGETS", "CUE_FAMILIES", "sample_positions",
]


