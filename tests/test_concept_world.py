"""ConceptWorld: determinism, exact masks, Broden schema, class rules, CGL preset, IoU calibration."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from replication.data import concept_world as cw
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
def planes(world) -> dict:
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
    assert cw.WorldConfig(image_size=128).mask_size == 64


def test_profiles_build_world_configs():
    for name in ("ci", "default", "gpu"):
        profile = load_profile(name)
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
    counts = {"color": 11, "object": 10, "scene": 5, "texture": 8, "material": 8}
    for row in categories.itertuples():
        table = pd.read_csv(world / f"c_{row.name}.csv", keep_default_na=False)
        assert list(table.columns) == ["code", "number", "name", "frequency", "coverage"]
        assert list(table["code"]) == list(range(1, len(table) + 1)) and len(table) == row.count
        assert row.name not in counts or len(table) == counts[row.name]
    tasks = pd.read_csv(world / "tasks.csv")
    assert list(tasks.columns) == list(cw.TASK_HEADER) and list(tasks["image"]) == list(index["image"])
    assert tasks["class_id"].nunique() == 10 and set(tasks["superclass"]) == {"urban", "nature"}


def test_the_broden_reader_reads_the_world(world):
    dataset = BrodenDataset(world, split="val")
    item = dataset[0]
    assert len(dataset) == 90 and item["image"].shape == (3, 64, 64)
    assert item["pixel_labels"].shape[1:] == (32, 32) and item["image_labels"].numel() >= 2
    assert dataset.labels.loc[dataset.labels["name"] == "brick", "category"].item() in ("material", "texture")


def test_colour_masks_match_the_painted_pixels(world, planes):
    rows = cw.sample_positions(64, 32)
    names = pd.read_csv(world / "c_color.csv").set_index("number")["name"]
    for i, image in enumerate(planes["index"]["image"]):
        pixels = _read(world / "images", image)[np.ix_(rows, rows)]
        colour = planes["color"][i]
        for number in np.unique(colour[colour > 0]):
            painted = pixels[colour == number]
            shades = np.array(PALETTE[names[number]])
            exact = (painted[:, None, :] == shades[None]).all(axis=2).any(axis=1)
            assert exact.all(), f"{image}: colour {names[number]} mask has pixels of another colour"
    assert (planes["color"] > 0).mean() > 0.5


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
                cat.number("material", m) if m else 0 for _, m in cw.STYLES[piece.style_name].finishes)
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


def test_distractors_defeat_single_cues(world, planes):
    """Within a scene, the key object type and the key colour also occur in the other class's images."""
    cat = cw.catalogue("classification")
    tasks = pd.read_csv(world / "tasks.csv")
    for class_id, rule in enumerate(cw.CLASS_RULES):
        others = [c for c, r in enumerate(cw.CLASS_RULES) if r.scene == rule.scene and c != class_id]
        rows = np.flatnonzero(tasks["class_id"].isin(others).to_numpy())
        has_object = (planes["object"][rows] == cat.number("object", rule.object)).any(axis=(1, 2))
        assert has_object.any(), f"{rule.name}: its object never appears as a distractor in its scene"


def test_iou_calibration_perfect_detector_reaches_half(world, planes):
    """A perfect detector (the concept's mask, ties broken at random) thresholded at the top 0.5%."""
    rng = np.random.default_rng(0)
    quantile = 0.005
    coverage = cw.concept_coverage(world).set_index("label")
    results = {}
    for category, stack in (("object", [planes["object"]]), ("part", [planes["part1"], planes["part2"]])):
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
            results.setdefault(category, []).append(iou)
    assert np.median(results["object"]) >= 0.5, results["object"]
    assert np.median(results["part"]) >= 0.5, results["part"]


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
    assert len(train) + len(val) == 300 and len(train.classes) == 10
    assert train.superclasses == ["urban", "nature"] and train.superclass_of[0] == 0 and train.superclass_of[9] == 1
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
