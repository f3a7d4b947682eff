"""ConceptWorld: determinism, exact masks, Broden schema, class rules, cue bounds, object sizes, IoU
ceilings and their calibration, dither, CGL preset."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from replication.data import concept_world as cw, world_design, world_statistics
from replication.data.broden import BrodenDataset, decode_label_mask
from replication.data.classification import ClassificationDataset, ConceptImageDataset
from replication.data.drawing import PALETTE
from replication.profiles import load_profile


def _read(root: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(root / name).convert("RGB"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A default-size (64 px, 32 px masks) world, large enough for the calibration test."""
    config = cw.WorldConfig(n_images=300, image_size=64, seed=3)
    return cw.generate_world(config, tmp_path_factory.mktemp("cw") / "world", workers=2)


@pytest.fixture(scope="module")
def default_world(tmp_path_factory) -> Path:
    """The default profile's world: 4000 images at 64 px, seed 0 (cue bounds and IoU ceilings)."""
    config = cw.WorldConfig(n_images=4000, image_size=64, seed=0)
    return cw.generate_world(config, tmp_path_factory.mktemp("cw") / "default", workers=2)


@pytest.fixture(scope="module")
def planes(world) -> dict:
    return _planes(world)


def _planes(world: Path) -> dict:
    """Every mask of the world decoded: {category: N×sh×sw}, part as plane 1 and plane 2."""
    index = pd.read_csv(world / "index.csv", keep_default_na=False)
    sh, sw = int(index["sh"][0]), int(index["sw"][0])
    out = {k: np.zeros((len(index), sh, sw), dtype=np.int64) for k in ("color", "object", "material", "part1", "part2")}
    for i, row in index.iterrows():
        for category in ("color", "object", "material"):
            if row[category]:
                out[category][i] = decode_label_mask(_read(world / "images", row[category]))
        for plane, name in enumerate(filter(None, row["part"].split(";"))):
            out[f"part{plane + 1}"][i] = decode_label_mask(_read(world / "images", name))
    out["index"] = index
    return out


def _tree_parents(tree: dict) -> dict[int, set[int]]:
    """object label -> labels of its parts and sub-parts, from concept_tree.json."""
    parents: dict[int, set[int]] = {}

    def walk(node, owner):
        if node["category"] == "object":
            owner = node["label"]
            parents[owner] = set()
        elif node["category"] == "part":
            parents[owner].add(node["label"])
        for child in node["children"]:
            walk(child, owner)

    walk(tree, None)
    return parents


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_whatever_the_workers(tmp_path):
    config = cw.WorldConfig(n_images=40, seed=7)
    first = _all_files(cw.generate_world(config, tmp_path / "a", workers=1))
    second = _all_files(cw.generate_world(config, tmp_path / "b", workers=2))
    assert first.keys() == second.keys() and len(first) > 200
    assert [name for name in first if first[name] != second[name]] == []
    other = _all_files(cw.generate_world(cw.WorldConfig(n_images=40, seed=8), tmp_path / "c", workers=1))
    assert other["images/cw_000000.png"] != first["images/cw_000000.png"]
    assert other["index.csv"] != first["index.csv"]
    assert not list(tmp_path.glob(".*tmp*")), "the temporary folder was left behind"


def test_ensure_world_refuses_a_foreign_world_in_its_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_DATA", str(tmp_path))
    requested = cw.WorldConfig(n_images=20, seed=0)
    folder = cw.world_dir(requested)
    cw.generate_world(cw.WorldConfig(n_images=20, seed=5), folder, workers=1)
    with pytest.raises(ValueError, match="records another configuration.*delete that folder"):
        cw.ensure_world(requested, workers=1)
    shutil.rmtree(folder)
    assert cw.ensure_world(requested, workers=1) == folder
    assert cw.ensure_world(requested, workers=1) == folder  # a matching world is served


def test_a_killed_generations_temp_folder_is_cleaned(tmp_path):
    leftover = tmp_path / ".world.tmp-999999999"
    (leftover / "images").mkdir(parents=True)
    cw.generate_world(cw.WorldConfig(n_images=10, seed=0), tmp_path / "world", workers=1)
    assert not leftover.exists()


def test_existing_folder_is_refused_unless_overwrite(tmp_path):
    config = cw.WorldConfig(n_images=4)
    cw.generate_world(config, tmp_path / "w", workers=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        cw.generate_world(config, tmp_path / "w", workers=1)
    cw.generate_world(config, tmp_path / "w", workers=1, overwrite=True)


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="preset 'shapes' is not one of"):
        cw.WorldConfig(preset="shapes")
    with pytest.raises(ValueError, match="mask_size = 80"):
        cw.WorldConfig(image_size=64, mask_size=80)
    with pytest.raises(ValueError, match=r"confuser_rate = 2 .*; dither = -1 must lie in \[0, 16\]"):
        cw.WorldConfig(dither=-1, confuser_rate=2)
    assert cw.WorldConfig(image_size=128).mask_size == 64
    assert cw.WorldConfig().dither == 3 and cw.WorldConfig(preset="cgl_shapes").dither == 0
    assert cw.WorldConfig(dither=0).dither == 0


def test_profiles_build_world_configs():
    for name in ("ci", "default", "gpu", "paper"):
        profile = load_profile(name)
        if name == "paper":  # real Broden and class folders instead of [world]; CGL's synthetic task is generated there too
            assert "world" not in profile.sections
        else:
            assert profile.build(cw.WorldConfig, "world").preset == "classification"
        assert profile.build(cw.WorldConfig, "cgl_world").preset == "cgl_shapes"


def test_csv_schema_follows_broden(world):
    with open(world / "index.csv") as handle:
        assert next(csv.reader(handle)) == list(cw.INDEX_HEADER)
    index = pd.read_csv(world / "index.csv", keep_default_na=False)
    assert set(index["split"]) == {"train", "val"} and (index["split"] == "val").sum() == 90
    assert index["part"].str.contains(";").any() and not index["part"].str.contains(";").all()
    assert index["texture"].str.contains(";").any()
    assert (index[["ih", "iw"]] == 64).all().all() and (index[["sh", "sw"]] == 32).all().all()

    labels = pd.read_csv(world / "label.csv", keep_default_na=False)
    assert list(labels.columns) == ["number", "name", "category", "frequency", "coverage", "syns"]
    assert labels["category"].str.contains(";").any(), "some label must belong to two categories"
    assert labels.loc[labels["name"] == "brick", "category"].item().startswith("material(")
    assert (labels["number"] > 255).any()
    categories = pd.read_csv(world / "category.csv")
    assert list(categories.columns) == ["name", "first", "last", "count", "frequency"]
    assert list(categories["name"]) == ["color", "object", "part", "material", "scene", "texture"]
    counts = {"color": 11, "object": 11, "scene": 6, "texture": 25, "material": 8}
    for row in categories.itertuples():
        table = pd.read_csv(world / f"c_{row.name}.csv", keep_default_na=False)
        assert list(table.columns) == ["code", "number", "name", "frequency", "coverage"]
        assert list(table["code"]) == list(range(1, len(table) + 1)) and len(table) == row.count
        assert row.name not in counts or len(table) == counts[row.name]
    tasks = pd.read_csv(world / "tasks.csv")
    assert list(tasks.columns) == list(cw.TASK_HEADER) and list(tasks["image"]) == list(index["image"])
    assert tasks["class_id"].nunique() == 18 and set(tasks["superclass"]) == {"urban", "nature"}


def test_the_broden_reader_reads_the_world(world):
    dataset = BrodenDataset(world, split="val")
    item = dataset[0]
    assert len(dataset) == 90 and item["image"].shape == (3, 64, 64)
    assert item["pixel_labels"].shape[1:] == (32, 32) and item["image_labels"].numel() >= 2
    assert dataset.labels.loc[dataset.labels["name"] == "brick", "category"].item() in ("material", "texture")


def test_colour_masks_match_the_painted_pixels_up_to_the_dither(world, planes):
    rows = cw.sample_positions(64, 32)
    names = pd.read_csv(world / "c_color.csv").set_index("number")["name"]
    dither = cw.WorldConfig().dither
    for i, image in enumerate(planes["index"]["image"]):
        pixels = _read(world / "images", image)[np.ix_(rows, rows)].astype(int)
        colour = planes["color"][i]
        for number in np.unique(colour[colour > 0]):
            painted = pixels[colour == number]
            shades = np.array(PALETTE[names[number]])
            near = (np.abs(painted[:, None, :] - shades[None]) <= dither).all(axis=2).any(axis=1)
            assert near.all(), f"{image}: colour {names[number]} mask has pixels of another colour"
    # colour labels mark object parts only (backgrounds are off-palette tints)
    assert ((planes["color"] > 0) <= (planes["object"] > 0)).all()
    assert 0.1 < (planes["color"] > 0).mean() < 0.5


def test_dither_breaks_flat_fills(tmp_path):
    """A plain part is one RGB value without dither and many with it (F5: exact ties at a threshold)."""
    def key_part_values(dither: int) -> list[int]:
        root = cw.generate_world(cw.WorldConfig(n_images=6, seed=4, dither=dither), tmp_path / f"d{dither}", workers=1)
        evidence = np.asarray(Image.open(root / "evidence" / "cw_000000.png")) > 0
        index = pd.read_csv(root / "index.csv", keep_default_na=False)
        part = decode_label_mask(_read(root / "images", index["part"][0].split(";")[0]))
        tasks = pd.read_csv(root / "tasks.csv")
        rule = cw.CLASS_RULES[tasks["class_id"][0]]
        where = evidence & (part == cw.catalogue("classification").number("part", rule.part))
        rows = cw.sample_positions(64, 32)
        pixels = _read(root / "images", "cw_000000.png")[np.ix_(rows, rows)][where]
        return [len(np.unique(pixels.reshape(-1, 3), axis=0)), int(where.sum())]

    flat, dithered = key_part_values(0), key_part_values(3)
    assert flat[0] == 1 and flat[1] >= 10  # the key part is plain: one RGB value without dither
    assert dithered[0] > 5  # (same seed: the same image but for the dither, see the determinism test)


def test_objects_are_unions_of_their_parts_and_materials_of_parts(world, planes):
    parents = _tree_parents(json.loads((world / "concept_tree.json").read_text()))
    objects, part1, part2, material = planes["object"], planes["part1"], planes["part2"], planes["material"]
    assert np.array_equal(objects > 0, part1 > 0)
    for number, parts in parents.items():
        inside = objects == number
        assert np.isin(part1[inside], list(parts)).all() and np.isin(part2[inside], [0, *parts]).all()
    assert ((part2 > 0) <= (part1 > 0)).all() and (part2 > 0).any()
    assert ((material > 0) <= (part1 > 0)).all() and (material > 255).any()
    # every part label carries one of the materials its styles allow, and only there
    cat = cw.catalogue("classification")
    allowed = {}
    for obj in cw.OBJECTS:
        for piece in obj.pieces:
            key = (cat.number("object", obj.name), cat.number("part", piece.part),
                   cat.number("part", piece.subpart) if piece.subpart else 0)
            allowed.setdefault(key, set()).update(
                cat.number("material", m) if m else 0 for _, m in world_design.STYLES[piece.style_name].finishes)
    labelled = objects > 0
    triples = np.stack([objects[labelled], part1[labelled], part2[labelled], material[labelled]], axis=1)
    for o, p, s, m in np.unique(triples, axis=0):
        assert m in allowed[(o, p, s)], f"material {m} painted on object {o} part {p}/{s}"


def test_class_labels_follow_the_rules_and_evidence_marks_the_key_object(world, planes):
    cat = cw.catalogue("classification")
    tasks = pd.read_csv(world / "tasks.csv")
    index = planes["index"]
    for i, row in index.iterrows():
        scene = int(row["scene"])
        holds = []
        for class_id, rule in enumerate(cw.CLASS_RULES):
            where = (planes["object"][i] == cat.number("object", rule.object)) & (
                planes["part1"][i] == cat.number("part", rule.part))
            if rule.colour:
                where &= planes["color"][i] == cat.number("color", rule.colour)
            else:
                where &= planes["material"][i] == cat.number("material", rule.material)
            if scene == cat.number("scene", rule.scene) and where.any():
                holds.append(class_id)
        assert holds == [tasks["class_id"][i]], f"{row['image']}: rules {holds} hold, class {tasks['class_id'][i]}"
        evidence = np.asarray(Image.open(world / "evidence" / row["image"]))
        key = cat.number("object", cw.CLASS_RULES[tasks["class_id"][i]].object)
        assert set(np.unique(evidence)) <= {0, 255} and (planes["object"][i][evidence > 0] == key).all()
        assert (evidence > 0).any()


def test_confusers_put_key_types_and_key_colours_in_other_classes_images(world, planes):
    """Within a scene, each rule's object type and colour also occur in the other classes' images."""
    cat = cw.catalogue("classification")
    tasks = pd.read_csv(world / "tasks.csv")
    for class_id, rule in enumerate(cw.CLASS_RULES):
        others = [c for c, r in enumerate(cw.CLASS_RULES) if r.scene == rule.scene and c != class_id]
        rows = np.flatnonzero(tasks["class_id"].isin(others).to_numpy())
        has_object = (planes["object"][rows] == cat.number("object", rule.object)).any(axis=(1, 2))
        has_colour = (planes["color"][rows] == cat.number("color", rule.colour)).any(axis=(1, 2))
        assert has_object.mean() > 0.2, f"{rule.name}: its object type rarely appears in its scene's other classes"
        assert has_colour.mean() > 0.6, f"{rule.name}: its colour rarely appears in its scene's other classes"


def test_class_design_is_balanced_and_two_level():
    rules = cw.CLASS_RULES
    assert len(rules) == 18
    for field_name, expected in (("scene", 6), ("object", 6), ("colour", 6)):
        counts = pd.Series([getattr(r, field_name) for r in rules]).value_counts()
        assert len(counts) == expected and (counts == 3).all(), (field_name, counts)
    for scene in cw.SCENES:  # the three classes of a scene differ in object type and in colour
        mine = [r for r in rules if r.scene == scene.name]
        assert len({r.object for r in mine}) == 3 and len({r.colour for r in mine}) == 3
    assert pd.Series([r.superclass for r in rules]).value_counts().to_dict() == {"urban": 9, "nature": 9}
    assert set(cw.DISTRACTOR_TYPES).isdisjoint(r.object for r in rules) and len(cw.DISTRACTOR_TYPES) == 5
    assert {r.object: r.part for r in rules} == cw.KEY_PARTS


def _rules_holding(root: Path, planes: dict) -> list[list[int]]:
    """Per image, the ids of the classes.json rules that hold on its scene label and object/part/colour
    masks (read from disk: the rules as written, not the generator's constants)."""
    table = json.loads((root / "classes.json").read_text())["classes"]
    numbers = pd.read_csv(root / "label.csv", keep_default_na=False)
    number = {(category.split("(")[0], name): n for n, name, cats in zip(numbers["number"], numbers["name"], numbers["category"])
              for category in cats.split(";")}
    holding = []
    for i, row in planes["index"].iterrows():
        holds = []
        for entry in table:
            rule = entry["rule"]
            part = number[("part", rule["part"])]
            where = ((planes["object"][i] == number[("object", rule["object"])])
                     & ((planes["part1"][i] == part) | (planes["part2"][i] == part))
                     & (planes["color"][i] == number[("color", rule["color"])]))
            if int(row["scene"]) == number[("scene", rule["scene"])] and where.any():
                holds.append(entry["id"])
        holding.append(holds)
    return holding


def test_class_is_a_deterministic_function_of_the_labels(world, planes):
    """The class follows from the label files alone (Bayes accuracy 100%): exactly one rule of
    classes.json holds on every image's labels, and it is the image's class; and images with equal
    labels never have different classes."""
    tasks = pd.read_csv(world / "tasks.csv")
    assert _rules_holding(world, planes) == [[c] for c in tasks["class_id"]]
    signatures: dict[tuple, int] = {}
    for i, row in planes["index"].iterrows():
        labelled = planes["object"][i] > 0
        triples = np.stack([planes["object"][i][labelled], planes["part1"][i][labelled], planes["color"][i][labelled]], 1)
        signature = (row["scene"], frozenset(map(tuple, np.unique(triples, axis=0).tolist())))
        assert signatures.setdefault(signature, tasks["class_id"][i]) == tasks["class_id"][i]


def test_tiny_images_and_masks_still_show_the_key_part(tmp_path):
    """At 16 px with 4-px masks the key part is redrawn until it shows in the masks."""
    root = cw.generate_world(cw.WorldConfig(n_images=60, image_size=16, mask_size=4, seed=2), tmp_path / "t", workers=1)
    tasks = pd.read_csv(root / "tasks.csv")
    assert _rules_holding(root, _planes(root)) == [[c] for c in tasks["class_id"]]


def test_objects_are_large_and_their_parts_several_pixels_wide(world):
    """Object boxes cover 8-16% of the image when unoccluded; key parts span 1.5+ cells of a stride-8 map."""
    sizes = world_statistics.object_sizes(world)
    assert 0.07 <= sizes.loc["object box share", "median"] <= 0.16 and sizes.loc["object box share", "90%"] <= 0.2
    assert sizes.loc["key part width (px)", "median"] >= 12, sizes  # >= 1.5 positions of a stride-8 map
    assert sizes.loc["key part width (stride-8 positions)", "median"] == sizes.loc["key part width (px)", "median"] / 8


def test_cue_bounds_single_cues_stay_at_most_40_percent(default_world):
    """No single cue family decides the class: the best rule of the scene, the set of object types or
    the set of colours (fitted on train, scored on val) stays <= 40% on a default-size world."""
    bounds = cw.cue_bounds(default_world, pairs=True).set_index("cue")
    single = bounds.loc[list(cw.CUE_FAMILIES)]
    assert (single["val_accuracy"] <= 0.40).all(), single
    assert (single["val_accuracy"] >= 0.1).all(), single  # each cue carries some information (sanity)
    assert (single["val_fit_accuracy"] >= single["val_accuracy"] - 0.02).all()
    assert single.loc["scene", "values"] == 6 and single.loc["scene", "val_accuracy"] == pytest.approx(1 / 3, abs=0.05)
    assert {"scene + object set", "scene + colour set", "object set + colour set"} <= set(bounds.index)
    assert bounds["majority"].max() < 0.1


def test_cue_bounds_hand_made():
    """The rule of a cue value is its most frequent train class; unseen values get train's majority."""
    cues = pd.DataFrame({"split": ["train"] * 5 + ["val"] * 3, "class_id": [0, 0, 1, 1, 1, 0, 1, 1],
                         "scene": ["a", "a", "a", "b", "b", "a", "b", "c"], "object set": [""] * 8,
                         "colour set": ["x", "y", "x", "y", "x", "x", "y", "z"]})
    bounds = cw.cue_bounds("unused", cues=cues).set_index("cue")
    assert list(bounds.index) == ["scene", "colour set"]  # no object labels: that family is left out
    # scene: a -> 0, b -> 1, c unseen -> 1 (train majority): val 0, 1, 1 right on images 0 and 1... and 2
    assert bounds.loc["scene", "val_accuracy"] == pytest.approx(1.0)
    # colour: x -> 1 (0, 1, 1), y -> 0 (0, 1), z unseen -> 1: val (x, 0) wrong, (y, 1) wrong, (z, 1) right
    assert bounds.loc["colour set", "val_accuracy"] == pytest.approx(1 / 3)
    assert bounds.loc["colour set", "val_fit_accuracy"] == pytest.approx(1.0)


def test_rule_concepts_count_the_classes_each_concept_defines(world):
    """Every concept a class rule names, once, with the number of rules naming it; scenes are capped."""
    concepts = world_statistics.rule_concepts(world).set_index(["category", "concept"])
    rules = [c["rule"] for c in json.loads((world / "classes.json").read_text())["classes"]]
    assert concepts["classes"].sum() == sum(len(rule) for rule in rules)
    assert concepts.loc[("object", "car"), "classes"] == sum(rule["object"] == "car" for rule in rules)
    assert set(concepts.index.get_level_values("category")) == {"scene", "object", "part", "color"}
    capped = concepts["capped_by_design"] != ""
    assert set(concepts.index[capped].get_level_values("category")) == {"scene"}


def test_iou_ceiling_matches_a_perfect_detector(world, planes):
    """A perfect detector (the concept's mask, ties broken at random) thresholded at the top 0.5%
    reaches the IoU that `iou_ceiling` predicts from the concept's coverage."""
    rng = np.random.default_rng(0)
    quantile = 0.005
    coverage = cw.concept_coverage(world).set_index("label")
    for stack in ([planes["object"]], [planes["part1"], planes["part2"]]):
        for number in np.unique(np.concatenate([s[s > 0] for s in stack])):
            concept = np.zeros(stack[0].shape, dtype=bool)
            for plane in stack:
                concept |= plane == number
            score = concept + rng.uniform(0, 0.5, size=concept.shape)
            threshold = np.quantile(score, 1 - quantile)
            detected = score >= threshold
            iou = (detected & concept).sum() / (detected | concept).sum()
            assert coverage.loc[number, "coverage"] == pytest.approx(concept.mean(), rel=1e-3)
            assert iou == pytest.approx(cw.iou_ceiling(concept.mean(), quantile), abs=0.02)


def test_iou_ceilings_reach_their_targets(default_world):
    """Objects and parts >= 0.2, every other category >= 0.1, but the concepts capped by design."""
    coverage = cw.concept_coverage(default_world)
    capped = coverage[coverage["capped_by_design"] != ""]
    assert set(zip(capped["category"], capped["concept"])) == set(cw.CAPPED_BY_DESIGN)
    assert set(capped["category"]) == {"scene", "texture"}
    rest = coverage[coverage["capped_by_design"] == ""]
    target = rest["category"].map(cw.IOU_CEILING_TARGETS)
    assert set(rest["category"]) == {"color", "object", "part", "material", "texture"}
    below = rest[rest["iou_ceiling"] < target]
    assert below.empty, below[["category", "concept", "images", "coverage", "iou_ceiling"]]
    assert (rest["images"] > 0).all()


def test_concept_image_sets_and_their_dataset(world):
    sets = cw.concept_image_sets(world, ["car", "wheel", "vehicle"], split="train", limit=20)
    assert set(sets) == {"car", "wheel", "vehicle"}
    assert set(sets["vehicle"]["concept"]) <= {"car", "boat", "bicycle"} and len(set(sets["vehicle"]["concept"])) > 1
    assert set(sets["car"]["concept"]) == {"car"} and set(sets["wheel"]["object"]) <= {"car", "bicycle"}
    assert set(cw.concept_image_sets(world, ["wheel"])["wheel"]["object"]) == {"car", "bicycle"}
    for table in sets.values():
        assert len(table) == 20 and (table["split"] == "train").all()
        assert ((table["top"] < table["bottom"]) & (table["left"] < table["right"])).all()
        assert (table["bottom"] <= 64).all() and (table["top"] >= 0).all()
        assert table["pixels"].is_monotonic_decreasing
    data = ConceptImageDataset(world, sets, image_size=32)
    image, concept = data[25]
    assert image.shape == (3, 32, 32) and concept == 1 and len(data) == 60
    with pytest.raises(ValueError, match="no instance of concept 'unicorn'"):
        cw.concept_image_sets(world, ["unicorn"])


def test_classification_dataset_conceptworld_and_imagefolder(world, tmp_path):
    train, val = ClassificationDataset(world, "train"), ClassificationDataset(world, "val")
    assert len(train) + len(val) == 300 and len(train.classes) == 18
    assert train.superclasses == ["urban", "nature"] and train.superclass_of[0] == 0 and train.superclass_of[17] == 1
    catalogue = {rule.name: rule.as_dict() for rule in cw.CLASS_RULES}  # the rules the world was written from
    assert train.rules == [catalogue[name] for name in train.classes] and train.rules[0]["scene"] == cw.CLASS_RULES[0].scene
    image, target = val[0]
    assert image.shape == (3, 64, 64) and target == pd.read_csv(world / "tasks.csv").query("split == 'val'")["class_id"].iloc[0]

    for name in ("cat", "dog"):
        (tmp_path / "real" / "train" / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (20, 10), (k * 100, 0, 0)).save(tmp_path / "real" / "train" / name / f"{k}.jpg")
    folder = ClassificationDataset(tmp_path / "real", "train", image_size=16)
    assert folder.classes == ["cat", "dog"] and folder.targets == [0, 0, 1, 1] and folder[3][0].shape == (3, 16, 16)
    assert folder.rules == [{}, {}]
    with pytest.raises(FileNotFoundError, match="neither tasks.csv"):
        ClassificationDataset(tmp_path / "real", "val")


def test_cgl_preset_has_15_concepts_and_the_square_label(tmp_path):
    root = cw.generate_world(cw.WorldConfig(preset="cgl_shapes", n_images=60, seed=1), tmp_path / "cgl", workers=1)
    labels = pd.read_csv(root / "label.csv", keep_default_na=False)
    assert len(labels) == 15
    groups = json.loads((root / "classes.json").read_text())["concept_groups"]
    assert [len(groups[k]) for k in ("color", "shape", "color-shape")] == [3, 3, 9]
    assert ClassificationDataset(root, "train").rules == [{}, {}]  # "square" or not: no scene/object rule
    assert set(labels["name"]) == {*groups["color"], *groups["shape"], *groups["color-shape"]}
    index = pd.read_csv(root / "index.csv", keep_default_na=False)
    tasks = pd.read_csv(root / "tasks.csv")
    square = labels.set_index("name").loc["square", "number"]
    for i, row in index.iterrows():
        objects = decode_label_mask(_read(root / "images", row["object"]))
        assert tasks["class_id"][i] == int((objects == square).any())
        assert len(np.unique(objects)) in (2, 3)  # background + one or two shape types
    assert 0 < tasks["class_id"].mean() < 1
    combo = cw.generate_world(cw.WorldConfig(preset="cgl_shapes", n_images=5, cgl_task="combination"),
                              tmp_path / "combo", workers=1)
    assert len(json.loads((combo / "classes.json").read_text())["classes"]) == 45


def test_ensure_world_caches_under_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_DATA", str(tmp_path))
    config = cw.WorldConfig(n_images=3)
    folder = cw.ensure_world(config, workers=1)
    assert folder.parent == tmp_path / "concept_world" and (folder / "DONE.json").exists()
    stamp = (folder / "index.csv").stat().st_mtime_ns
    assert cw.ensure_world(config) == folder and (folder / "index.csv").stat().st_mtime_ns == stamp
