"""Reading a generated ConceptWorld back: IoU ceilings and concept coverage (with the concepts capped
by design and the ceiling targets), the single-cue bounds of the task, and concept image sets."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from replication import io
from replication.data.broden import decode_label_mask
from replication.data.world_design import KEY_PARTS, SCENES


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


def rule_concepts(root: str | os.PathLike) -> pd.DataFrame:
    """The concepts that define the classes of a ConceptWorld task, one row per (category, concept):
    `classes` (how many class rules name it) and `capped_by_design` (the reason from `CAPPED_BY_DESIGN`,
    "" otherwise), in the order the rules name them (category by category)."""
    classes = io.read_json(Path(root) / "classes.json")["classes"]
    counts: dict[tuple[str, str], int] = {}
    for category in dict.fromkeys(key for entry in classes for key in entry["rule"]):
        for entry in classes:
            if category in entry["rule"]:
                key = (category, entry["rule"][category])
                counts[key] = counts.get(key, 0) + 1
    return pd.DataFrame([{"category": category, "concept": concept, "classes": n,
                          "capped_by_design": CAPPED_BY_DESIGN.get((category, concept), "")}
                         for (category, concept), n in counts.items()])


def object_sizes(root: str | os.PathLike, strides: Sequence[int] = (8, 16)) -> pd.DataFrame:
    """How large objects and key parts are drawn (from the world's `instances.csv`, visible boxes), as
    quantiles (10%, median, 90%): `object box share` (box area / image area) and `key part width (px)`
    (the thinner side of a key part's box: the part of a class rule, e.g. a car's body), plus that width
    in positions of a feature map of each stride in `strides` (a stride-8 map is ResNet-18's layer4 on
    small inputs)."""
    root = Path(root)
    table = pd.read_csv(root / "instances.csv")
    index = pd.read_csv(root / "index.csv").set_index("image")
    image_area = (index.loc[table["image"], "ih"] * index.loc[table["image"], "iw"]).to_numpy()
    is_object = (table["category"] == "object").to_numpy()
    objects = table[is_object]
    keys = table[(table["category"] == "part") & (table["role"] == "key")]
    keys = keys[[KEY_PARTS[o] == c for o, c in zip(keys["object"], keys["concept"])]]
    box_area = (objects["bottom"] - objects["top"]) * (objects["right"] - objects["left"])
    rows = {"object box share": box_area / image_area[is_object],
            "key part width (px)": np.minimum(keys["bottom"] - keys["top"], keys["right"] - keys["left"])}
    rows.update({f"key part width (stride-{s} positions)": rows["key part width (px)"] / s for s in strides})
    return pd.DataFrame({name: values.quantile([0.1, 0.5, 0.9]).to_numpy() for name, values in rows.items()},
                        index=["10%", "median", "90%"]).T
