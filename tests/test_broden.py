"""The Broden reader against the hand-made fixture of `tests/broden_fixture.py`, whose truth is known."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import replication  # noqa: F401  (before torchvision, which the loader stack may import)
from replication.data.broden import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BrodenDataset,
    BrodenFormatError,
    broden_loader,
    decode_label_mask,
    encode_label_mask,
)
from tests.broden_fixture import INDEX_HEADER, TinyBroden, write_tiny_broden
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyBroden:
    """Read-only dataset shared by the tests that do not modify files."""
    return write_tiny_broden(tmp_path_factory.mktemp("broden"), n_images=24, seed=0)


@pytest.fixture
def scratch(tmp_path) -> TinyBroden:
    """A fresh copy for tests that damage files."""
    return write_tiny_broden(tmp_path / "broden", n_images=12, seed=1)


def _rewrite(path: Path, edit) -> None:
    """Apply `edit(rows)` to the list of rows (header first) of a CSV file."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows = edit(rows)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


def _set_cell(path: Path, line: int, column: str, value: str) -> None:
    def edit(rows):
        rows[line - 1][rows[0].index(column)] = value
        return rows

    _rewrite(path, edit)


def _assert_sample(sample: dict, tiny: TinyBroden, image, categories=None) -> None:
    assert torch.equal(sample["pixel_labels"], torch.from_numpy(tiny.pixel_labels(image, categories)))
    assert sample["image_labels"].tolist() == tiny.image_labels(image, categories)


# ---------------------------------------------------------------- decoding and content
def test_mask_decoding_is_r_plus_256_g_with_blue_ignored():
    rgb = np.array([[[44, 1, 7], [1, 2, 255], [255, 255, 0], [200, 0, 9]]], dtype=np.uint8)
    assert decode_label_mask(rgb).tolist() == [[300, 513, 65535, 200]]
    labels = np.array([[0, 255, 256, 65535]])
    assert decode_label_mask(encode_label_mask(labels)).tolist() == labels.tolist()
    with pytest.raises(ValueError, match="must lie in"):
        encode_label_mask(np.array([65536]))


def test_every_sample_matches_the_ground_truth(tiny):
    data = BrodenDataset(tiny.root)
    rows = tiny.rows()
    assert len(data) == len(rows) == 24
    assert data.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert data.mask_size == (32, 32) and data.image_size == (64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i, image in enumerate(rows):
        sample = data[i]
        _assert_sample(sample, tiny, image)
        expected = (torch.from_numpy(image.pixels).permute(2, 0, 1).float() / 255 - mean) / std
        assert_close(sample["image"], expected, atol=1e-5, msg=f"image {i}")
        present = [image.present(c) for c in data.categories]
        assert sample["category_present"].tolist() == present and sample["index"] == i


def test_labels_above_255_and_multiple_part_planes_are_read(tiny):
    data = BrodenDataset(tiny.root, categories=["part"])
    two_planes = [i for i, image in enumerate(tiny.rows(categories=["part"])) if len(image.masks["part"]) == 2]
    assert two_planes, "the fixture must hold rows with two part planes"
    sample = data[two_planes[0]]
    assert sample["pixel_labels"].shape == (2, 32, 32)
    # a pixel carries a top/bottom label on plane 1 and a left/right label on plane 2 at the same time
    both = (sample["pixel_labels"][0] > 0) & (sample["pixel_labels"][1] > 0)
    assert both.any() and set(sample["pixel_labels"][1][both].unique().tolist()) <= {42, 513}
    assert 513 in torch.cat([data[i]["pixel_labels"].flatten() for i in two_planes]).tolist()
    objects = BrodenDataset(tiny.root, categories=["object"])
    assert 300 in torch.cat([objects[i]["pixel_labels"].flatten() for i in range(len(objects))]).tolist()


def test_scalar_scene_and_texture_labels(tiny):
    data = BrodenDataset(tiny.root, categories=["scene", "texture"])
    image = tiny.images[3]  # i % 4 == 3: two texture labels joined by ';'
    sample = data[3]
    assert sample["pixel_labels"].shape == (0, 32, 32)
    assert sample["image_labels"].tolist() == [*image.image_labels["scene"], 60, 62]
    assert data[0]["image_labels"].tolist() == tiny.images[0].image_labels["scene"]  # empty texture cell


def test_category_restriction_keeps_order_and_drops_rows_without_data(tiny):
    data = BrodenDataset(tiny.root, categories=["part", "object"])
    assert data.categories == ["object", "part"] and data.pixel_categories == ["object", "part"]
    for i, image in enumerate(tiny.rows(categories=["object", "part"])):
        _assert_sample(data[i], tiny, image, ["object", "part"])
        assert data[i]["category_present"].tolist() == [True, image.present("part")]
    material = BrodenDataset(tiny.root, categories=["material"])
    rows = tiny.rows(categories=["material"])
    assert len(material) == len(rows) == 12 < len(tiny.images)
    assert material.index["image"].tolist() == [image.name for image in rows]
    kept_all = BrodenDataset(tiny.root, categories=["material"], drop_unlabelled=False)
    assert len(kept_all) == 24 and kept_all[1]["pixel_labels"].shape == (0, 32, 32)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split(tiny, split):
    data = BrodenDataset(tiny.root, split=split)
    rows = tiny.rows(split=split)
    assert 0 < len(data) == len(rows) < 24
    assert data.index["image"].tolist() == [image.name for image in rows]
    assert set(data.index["split"]) == {split}
    _assert_sample(data[len(data) - 1], tiny, rows[-1])


def test_label_table_and_primary_category(tiny):
    data = BrodenDataset(tiny.root)
    assert data.num_labels == 514 and data.label_names[300] == "square" and data.label_names[7] == ""
    expected = tiny.primary()
    assert data.labels["category"].to_dict() == expected
    assert data.labels.loc[21, "name"] == "wood" and data.labels.loc[21, "coverage"] > 0
    assert [data.categories[c] for c in data.primary_category[data.labels.index.tolist()].tolist()] == list(
        expected[n] for n in data.labels.index
    )
    assert data.primary_category[0] == -1 and data.primary_category[7] == -1
    restricted = BrodenDataset(tiny.root, categories=["material", "scene"])
    assert restricted.labels.loc[21, "category"] == "material"  # the only selected category of "wood"
    assert restricted.primary_category[21] == 0 and restricted.primary_category[1] == -1
    assert pd.isna(restricted.labels.loc[1, "category"])


def test_primary_category_by_coverage_or_by_count(scratch):
    # wood (21) is object(n) and material(m) with n > m; give material the larger coverage
    def edit(rows):
        for row in rows[1:]:
            if row[1] == "21":
                row[4] = "999.0"
        return rows

    _rewrite(scratch.root / "c_material.csv", edit)
    assert scratch.counts[21]["object"] > scratch.counts[21]["material"]
    assert BrodenDataset(scratch.root).labels.loc[21, "category"] == "material"
    assert BrodenDataset(scratch.root, primary_by="count").labels.loc[21, "category"] == "object"


def test_column_order_does_not_matter(tiny, tmp_path):
    shuffled = write_tiny_broden(tmp_path / "shuffled", n_images=24, seed=0, columns=list(reversed(INDEX_HEADER)))
    assert (shuffled.root / "index.csv").read_text().startswith("texture,scene,material")
    a, b = BrodenDataset(tiny.root), BrodenDataset(shuffled.root)
    assert len(a) == len(b)
    for i in range(len(a)):
        for key in ("image", "pixel_labels", "image_labels", "category_present"):
            assert torch.equal(a[i][key], b[i][key]), (i, key)


def test_image_size_resizes_images_but_not_masks(tiny):
    sample = BrodenDataset(tiny.root, image_size=(40, 48))[0]
    assert sample["image"].shape == (3, 40, 48) and sample["pixel_labels"].shape[-2:] == (32, 32)


def test_fingerprint_is_stable_and_tracks_files_and_settings(scratch):
    first = BrodenDataset(scratch.root).fingerprint
    assert first == BrodenDataset(scratch.root).fingerprint and re.fullmatch(r"[0-9a-f]{16}", first)
    others = {
        BrodenDataset(scratch.root, split="val").fingerprint,
        BrodenDataset(scratch.root, categories=["object"]).fingerprint,
        BrodenDataset(scratch.root, image_size=32).fingerprint,
    }
    assert first not in others and len(others) == 3
    _set_cell(scratch.root / "label.csv", 2, "name", "crimson")
    assert BrodenDataset(scratch.root).fingerprint != first


# ---------------------------------------------------------------- loader
def test_loader_batches_pad_planes_and_scalars(tiny):
    data = BrodenDataset(tiny.root)
    batches = list(broden_loader(data, batch_size=5))
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 4]
    first = batches[0]
    planes = max(len(tiny.pixel_labels(image)) for image in tiny.images[:5])
    scalars = max(len(tiny.image_labels(image)) for image in tiny.images[:5])
    assert first["image"].shape == (5, 3, 64, 64) and first["image"].dtype == torch.float32
    assert first["pixel_labels"].shape == (5, planes, 32, 32) and first["pixel_labels"].dtype == torch.int64
    assert first["image_labels"].shape == (5, scalars) and first["image_labels"].dtype == torch.int64
    assert first["category_present"].shape == (5, 6) and first["category_present"].dtype == torch.bool
    assert first["index"].tolist() == [0, 1, 2, 3, 4]
    for b, image in enumerate(tiny.images[:5]):
        own = tiny.pixel_labels(image)
        assert torch.equal(first["pixel_labels"][b, : len(own)], torch.from_numpy(own))
        assert not first["pixel_labels"][b, len(own):].any()
        labels = tiny.image_labels(image)
        assert first["image_labels"][b].tolist() == labels + [0] * (scalars - len(labels))


def test_loader_shuffle_is_seeded_and_workers_give_the_same_batches(tiny):
    data = BrodenDataset(tiny.root, categories=["object", "scene"])
    order = [b["index"].tolist() for b in broden_loader(data, batch_size=8, shuffle=True, seed=3)]
    assert order == [b["index"].tolist() for b in broden_loader(data, batch_size=8, shuffle=True, seed=3)]
    assert sorted(sum(order, [])) == list(range(24)) and sum(order, []) != list(range(24))
    serial = list(broden_loader(data, batch_size=12))
    parallel = list(broden_loader(data, batch_size=12, num_workers=1))
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


# ---------------------------------------------------------------- bad input
def test_missing_directory_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape("python -m replication world --profile default --out")):
        BrodenDataset(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_part.csv"])
def test_missing_csv_is_named(scratch, name):
    (scratch.root / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(name)} is missing; .* not a valid Broden directory"):
        BrodenDataset(scratch.root)


def test_missing_coverage_file_suggests_count_rule(scratch):
    (scratch.root / "c_part.csv").unlink()
    with pytest.raises(FileNotFoundError, match="primary_by='count'"):
        BrodenDataset(scratch.root)
    assert len(BrodenDataset(scratch.root, primary_by="count")) == 12


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[:4] + [rows[4][:5]] + rows[5:], r"index\.csv line 5: the number of fields differs"),
        (lambda rows: rows[:3] + [rows[3] + ["extra"]] + rows[4:], r"index\.csv line 4: the number of fields differs"),
        (lambda rows: [[c for c in rows[0] if c != "sh"]] + rows[1:], r"index\.csv line 1: header lacks column\(s\) sh"),
    ],
)
def test_malformed_index_names_the_line(scratch, edit, message):
    _rewrite(scratch.root / "index.csv", edit)
    with pytest.raises(BrodenFormatError, match=message):
        BrodenDataset(scratch.root)


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("sh", "abc", r"index\.csv line 3: sh = 'abc' is not an integer"),
        ("split", "test", r"index\.csv line 3: split 'test' is neither 'train' nor 'val'"),
        ("scene", "999", r"index\.csv line 3: scene label 999 is not in label\.csv"),
        ("texture", "60;x", r"index\.csv line 3: texture = 'x' is not an integer"),
        ("sw", "16", r"index\.csv line 3: mask size \(32, 16\) differs"),
    ],
)
def test_malformed_index_cells_name_the_line(scratch, column, value, message):
    _set_cell(scratch.root / "index.csv", 3, column, value)
    with pytest.raises(BrodenFormatError, match=message):
        BrodenDataset(scratch.root)


def test_malformed_label_csv_names_the_line(scratch):
    _set_cell(scratch.root / "label.csv", 4, "category", "color9")
    with pytest.raises(BrodenFormatError, match=r"label\.csv line 4: category entry 'color9' is not like"):
        BrodenDataset(scratch.root)


def test_unknown_category_and_split(tiny):
    with pytest.raises(ValueError, match=r"unknown category 'animal'; .*category\.csv has color, object"):
        BrodenDataset(tiny.root, categories=["object", "animal"])
    with pytest.raises(ValueError, match=r"unknown split 'test'; use None \(all images\), 'train' or 'val'"):
        BrodenDataset(tiny.root, split="test")


def _write_unknown_labels(mask: Path, labels: np.ndarray) -> None:
    labels = labels.copy()
    labels[0, :3] = [777, 7, 4464]  # 7 is a gap in label.csv, 777 and 4464 lie beyond its largest number
    Image.fromarray(encode_label_mask(labels)).save(mask)


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda mask, labels: mask.unlink(), FileNotFoundError, r"is missing"),
        (_write_unknown_labels, BrodenFormatError, r"has label\(s\) 7, 777, 4464 not in label\.csv"),
    ],
)
def test_bad_mask_is_named_when_loaded_and_nothing_stale_is_cached(scratch, damage, error, message):
    data = BrodenDataset(scratch.root)
    image = scratch.images[5]
    _assert_sample(data[5], scratch, image)
    mask = scratch.root / "images" / image.files["object"][0]
    kept = mask.read_bytes()
    damage(mask, image.masks["object"][0])
    pattern = rf"mask file .*{re.escape(mask.name)} \(index\.csv line 7\) {message}"
    with pytest.raises(error, match=pattern):
        data[5]
    with pytest.raises(error, match=pattern):
        data.validate()
    mask.write_bytes(kept)
    _assert_sample(data[5], scratch, image)
    data.validate()


def test_mask_of_wrong_size_is_named(scratch):
    mask = scratch.root / "images" / scratch.images[0].files["object"][0]
    Image.fromarray(encode_label_mask(np.zeros((16, 32), dtype=np.int64))).save(mask)
    with pytest.raises(BrodenFormatError, match=r"is 16×32, not sh×sw = 32×32"):
        BrodenDataset(scratch.root)[0]


def test_failed_construction_leaves_nothing_behind(scratch):
    index = scratch.root / "index.csv"
    kept = index.read_bytes()
    _set_cell(index, 2, "split", "holdout")
    with pytest.raises(BrodenFormatError, match="line 2"):
        BrodenDataset(scratch.root)
    index.write_bytes(kept)
    data = BrodenDataset(scratch.root)
    assert len(data) == 12
    _assert_sample(data[0], scratch, scratch.images[0])


def test_unsupported_category_must_be_left_out(scratch):
    _rewrite(scratch.root / "category.csv", lambda rows: rows + [["action", "600", "610", "11", "5"]])
    with pytest.raises(BrodenFormatError, match=r"lists action, which this reader does not support .* pass categories="):
        BrodenDataset(scratch.root)
    assert BrodenDataset(scratch.root, categories=["object"]).categories == ["object"]


def test_mixed_image_sizes_need_image_size(scratch):
    _set_cell(scratch.root / "index.csv", 2, "ih", "80")
    with pytest.raises(ValueError, match=r"several sizes .* pass image_size="):
        BrodenDataset(scratch.root)
    assert BrodenDataset(scratch.root, image_size=64)[0]["image"].shape == (3, 64, 64)


# ---------------------------------------------------------------- ConceptWorld round trip
def test_concept_world_reads_back(tmp_path):
    from replication.data.concept_world import WorldConfig, generate_world

    root = generate_world(WorldConfig(n_images=24, image_size=64, seed=0), tmp_path / "world", workers=1)
    data = BrodenDataset(root)
    data.validate()
    assert data.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert len(data) == 24 and data.mask_size == (32, 32) and data.image_size == (64, 64)
    assert len(BrodenDataset(root, split="train")) + len(BrodenDataset(root, split="val")) == 24
    batch = next(iter(broden_loader(data, batch_size=24)))
    used = torch.cat([batch["pixel_labels"].flatten(), batch["image_labels"].flatten()]).unique()
    used = used[used > 0]
    assert (data.primary_category[used] >= 0).all(), "every label in the masks has a primary category"
    assert batch["category_present"][:, data.categories.index("color")].all()
