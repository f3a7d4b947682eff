"""Network Dissection: planted detectors, hand-computed IoUs, exact quantiles, a brute-force tally."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from replication.analysis.dissection import dissect, dissect_features
from replication.analysis.thresholds import quantile_level, resize_maps
from tests.helpers import assert_close

# label numbers of the planted world; 7 belongs to a category the dataset does not select
NAMES = ["", "red", "disk", "square", "top", "bottom", "beach", "unused"]
CATEGORIES = ["color", "object", "part", "scene"]
PRIMARY = [-1, 0, 1, 1, 2, 2, 3, -1]
SIZE = 8


class PlantedBroden(Dataset):
    """In-memory dataset with the BrodenDataset interface: 8×8 masks, 16×16 images."""

    categories = CATEGORIES
    num_labels = len(NAMES)
    label_names = NAMES
    primary_category = torch.tensor(PRIMARY)
    mask_size = (SIZE, SIZE)

    def __init__(self, planes: list[np.ndarray], scenes: list[list[int]], seed: int = 0):
        self.planes, self.scenes = planes, scenes
        self.images = torch.randn(len(planes), 3, 2 * SIZE, 2 * SIZE, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.planes)

    def __getitem__(self, i):
        pixel = torch.as_tensor(self.planes[i], dtype=torch.int64).reshape(-1, SIZE, SIZE)
        present = torch.zeros(len(CATEGORIES), dtype=torch.bool)
        for label in pixel.unique().tolist():
            if label:
                present[PRIMARY[label]] = True
        present[3] = bool(self.scenes[i])
        return {"image": self.images[i], "pixel_labels": pixel,
                "image_labels": torch.tensor(self.scenes[i], dtype=torch.int64), "category_present": present, "index": i}


def box(label: int, top: int, left: int, size: int) -> np.ndarray:
    plane = np.zeros((SIZE, SIZE), dtype=np.int64)
    plane[top : top + size, left : left + size] = label
    return plane


def random_world(n: int = 6, seed: int = 0) -> PlantedBroden:
    """Random shapes, halves as parts on a second (sometimes third) plane, scenes on some images."""
    rng = np.random.default_rng(seed)
    planes, scenes = [], []
    for i in range(n):
        color = np.where(rng.random((SIZE, SIZE)) < 0.3, 1, 0)
        shape = box(int(rng.integers(2, 4)), int(rng.integers(0, 4)), int(rng.integers(0, 4)), 4)
        stack = [color, shape]
        if i % 2 == 0:
            top = shape.copy()
            top[top > 0] = 4
            top[int(np.argmax(shape.any(1))) + 2 :] = 0
            stack.append(top)
            if i % 4 == 0:
                stack.append(np.where(top > 0, 5, 0))  # an overlapping second part plane
        planes.append(np.stack(stack))
        scenes.append([6] if i % 3 else [])
    return PlantedBroden(planes, scenes, seed)


# ---------------------------------------------------------------- planted detectors and hand cases
def test_planted_detector_gets_iou_one_and_its_label():
    world = random_world()
    features = torch.zeros(len(world), 3, SIZE, SIZE)
    for i in range(len(world)):
        features[i, 0] = torch.as_tensor(world.planes[i][1] == 3, dtype=torch.float32)  # square detector
        features[i, 1] = torch.as_tensor(world.planes[i][1] == 2, dtype=torch.float32) * 2.0  # disk detector
    features[:, 2] = torch.rand(len(world), SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 0.1
    # quantile 0.5 > each indicator's share of positions: T = 0, and Lite's '>' keeps exactly the indicator
    result = dissect_features(features, world, quantile=0.5, batch_size=4, device="cpu")
    units = result.units.set_index("unit")
    assert units.loc[0, "label"] == "square" and units.loc[0, "category"] == "object"
    assert units.loc[1, "label"] == "disk"
    assert units.loc[0, "iou"] == 1.0 and units.loc[1, "iou"] == 1.0
    assert bool(units.loc[0, "detector"]) and bool(units.loc[1, "detector"])
    summary = result.summary.set_index("category")
    assert summary.loc["object", "detectors"] >= 2 and summary.loc["object", "unique_detectors"] >= 2
    assert math.isnan(result.iou[0, 7])  # label of an unselected category is not scored


def hand_world() -> PlantedBroden:
    """Image 0: disk with its top half as a part; image 1: square, no part annotation, a scene."""
    disk, square = box(2, 0, 0, 4), box(3, 4, 4, 4)
    top = box(4, 0, 0, 4)
    top[2:] = 0
    return PlantedBroden([np.stack([disk, top]), square[None]], [[], [6]])


def test_category_restricted_denominator_by_hand():
    world = hand_world()
    fires = torch.zeros(2, 1, SIZE, SIZE)
    fires[0, 0, :2, :4] = 1.0  # the 8 'top' pixels of image 0
    fires[1, 0, 4:, 4:] = 1.0  # the 16 square pixels of image 1, which has no part labels
    # quantile 0.25 > 24/128 active: T = 0, exactly the 1s fire ("overlap" = Lite's rule, the default)
    restricted = dissect_features(fires, world, quantile=0.25, batch_size=2, device="cpu")
    union = dissect_features(fires, world, quantile=0.25, batch_size=2, device="cpu", denominator="union")
    top, square, disk, beach = 4, 3, 2, 6
    # part: active pixels counted only on image 0 (8) -> 8 / (8 + 8 - 8) = 1; union: 8 / (24 + 8 - 8)
    assert restricted.iou[0, top] == 1.0
    assert union.iou[0, top] == pytest.approx(8 / 24, abs=1e-15)
    # object (both images carry objects): square 16 / (24 + 16 - 16); disk 8 / (24 + 16 - 8)
    assert restricted.iou[0, square] == pytest.approx(16 / 24, abs=1e-15)
    assert restricted.iou[0, disk] == pytest.approx(8 / 32, abs=1e-15)
    # scene 'beach' covers image 1 (64 pixels); only image 1 carries a scene: 16 / (16 + 64 - 16)
    assert restricted.iou[0, beach] == pytest.approx(16 / 64, abs=1e-15)
    assert union.iou[0, beach] == pytest.approx(16 / (24 + 64 - 16), abs=1e-15)
    assert restricted.units.loc[0, "label"] == "top" and restricted.units.loc[0, "part-iou"] == 1.0
    assert union.units.loc[0, "label"] == "square"
    counts = restricted.counts
    assert counts["label_pixels"][[disk, square, top, beach]].tolist() == [16, 16, 8, 64]
    assert counts["unit_category"][0].tolist() == [0, 24, 8, 16]  # no color labels anywhere


def overlap_world() -> PlantedBroden:
    """hand_world plus image 2: a disk with its top half as a part in the lower-right quarter."""
    disk, top = box(2, 4, 4, 4), box(4, 4, 4, 4)
    top[6:] = 0
    world = hand_world()
    return PlantedBroden([*world.planes, np.stack([disk, top])], [*world.scenes, []])


def test_activation_term_counts_only_images_where_the_unit_touches_the_category():
    """Lite's tally_units_cat: an image's active pixels count for category c only when some of them lie
    on a label of c (or the image has a whole-image label of c), not whenever the image carries c."""
    world = overlap_world()
    fires = torch.zeros(3, 1, SIZE, SIZE)
    fires[0, 0, :2, :4] = 1.0  # the 8 'top' pixels of image 0
    fires[1, 0, 4:, 4:] = 1.0  # the 16 square pixels of image 1 (no part labels, a scene)
    fires[2, 0, :2, :4] = 1.0  # 8 unlabelled pixels of image 2, which carries a disk and a 'top' elsewhere
    settings = dict(quantile=0.25, mask_comparison=">", batch_size=2, device="cpu")  # T = 0: exactly the 1s fire
    lite = dissect_features(fires, world, **settings)
    top, square, disk, beach = 4, 3, 2, 6
    # part: only image 0's 8 pixels touch a part -> 8 / (8 + 16 - 8); object: images 0 and 1 (24 pixels)
    assert lite.iou[0, top] == 0.5
    assert lite.iou[0, square] == pytest.approx(16 / (24 + 16 - 16), abs=1e-15)
    assert lite.iou[0, disk] == pytest.approx(8 / (24 + 32 - 8), abs=1e-15)
    assert lite.iou[0, beach] == pytest.approx(16 / (16 + 64 - 16), abs=1e-15)  # whole-image label of image 1
    assert lite.counts["unit_category"][0].tolist() == [0, 24, 8, 16]
    assert lite.units.loc[0, "part-label"] == "top" and lite.config["denominator"] == "overlap"
    # the looser rule (any image carrying the category) and the plain union, kept as options
    image = dissect_features(fires, world, denominator="image", **settings)
    assert image.iou[0, top] == pytest.approx(8 / (16 + 16 - 8), abs=1e-15)
    assert image.iou[0, disk] == pytest.approx(8 / (32 + 32 - 8), abs=1e-15)
    assert image.counts["unit_category"][0].tolist() == [0, 32, 16, 16]
    union = dissect_features(fires, world, denominator="union", **settings)
    assert union.iou[0, top] == pytest.approx(8 / (32 + 16 - 8), abs=1e-15)


def test_shrinking_averages_like_pil_instead_of_sampling_points():
    """A 32×32 map onto 8×8 masks (an early layer): Lite's PIL bilinear resize averages every map pixel
    in; point sampling reads only rows/columns 4i+1 and 4i+2 and misses a grid of hot pixels at 4i."""
    world = hand_world()
    fires = torch.zeros(2, 1, 4 * SIZE, 4 * SIZE)
    fires[0, 0, 0:16:4, 0:16:4] = 1.0  # one hot pixel in each 4×4 block of the disk (cells 0-3 × 0-3)
    settings = dict(quantile=0.05, mask_comparison=">", device="cpu")  # T = 0: every positive position fires
    averaged = dissect_features(fires, world, **settings)
    top, disk = 4, 2
    # the averaged map is positive on exactly the 16 disk cells of image 0 (the triangle filter of width
    # 2 × 4 map pixels reaches a hot pixel from its own cell and from the cell before it, never further)
    assert averaged.counts["unit_total"].tolist() == [16]
    assert averaged.iou[0, disk] == 1.0 and averaged.units.loc[0, "label"] == "disk"
    assert averaged.iou[0, top] == 0.5  # 8 / (16 + 8 - 8)
    sampled = dissect_features(fires, world, antialias=False, **settings)
    assert sampled.counts["unit_total"].tolist() == [0] and sampled.units.loc[0, "iou"] == 0.0


@pytest.mark.parametrize("shape", [(32, 32), (13, 6), (11, 17), (8, 8), (5, 5), (3, 7)])
def test_resizing_matches_pillow_bilinear_as_in_lite(shape):
    """Lite resizes with scipy's imresize(map, (sh, sw), mode='F'): Pillow's float bilinear resize."""
    from PIL import Image

    maps = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(sum(shape)))
    ours = resize_maps(maps, (SIZE, SIZE))
    for b in range(2):
        for k in range(3):
            pil = Image.fromarray(maps[b, k].numpy()).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            assert_close(ours[b, k], np.array(pil), atol=2e-6, rtol=0, msg=f"{shape} map {b},{k}")
    plain = F.interpolate(maps, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    if shape[0] <= SIZE and shape[1] <= SIZE:  # upsampling is unchanged, bit for bit
        assert torch.equal(ours, plain)
    else:
        assert torch.equal(resize_maps(maps, (SIZE, SIZE), antialias=False), plain)


def test_ties_at_the_threshold_do_not_fire_and_mask_area_is_reported():
    """Flat fills tie exactly at T_k. Lite keeps positions strictly above T_k (`mask > threshold`); a
    '>=' mask takes every tied position, more than the quantile's share: at T_k = 0 the whole image."""
    world = hand_world()
    fires = torch.zeros(2, 1, SIZE, SIZE)
    fires[0, 0, :2, :4] = 2.0  # the 8 'top' pixels of image 0; the other 120 of 128 positions tie at 0
    lite = dissect_features(fires, world, quantile=0.1, device="cpu")
    top = 4
    assert lite.iou[0, top] == 1.0 and lite.units.loc[0, "label"] == "top"
    assert lite.thresholds.tolist() == [0.0] and lite.config["mask_comparison"] == ">"
    assert lite.units.loc[0, "mask_fraction"] == 8 / 128  # within the quantile's share (0.1)
    ties = dissect_features(fires, world, quantile=0.1, device="cpu", mask_comparison=">=")
    assert ties.units.loc[0, "mask_fraction"] == 1.0  # fires everywhere
    assert ties.iou[0, top] == 8 / 64  # image 0's 64 active pixels touch 'top'; image 1 has no part
    # a flat region tied at a positive threshold: 16 of 128 positions at 1.0, T = 1.0, nothing above it
    square = torch.zeros(2, 1, SIZE, SIZE)
    square[1, 0, 4:, 4:] = 1.0
    flat = dissect_features(square, world, device="cpu")
    assert flat.thresholds.tolist() == [1.0] and flat.units.loc[0, "mask_fraction"] == 0.0
    assert list(flat.units.columns[:8]) == ["unit", "category", "label", "label_number", "iou", "detector",
                                            "threshold", "mask_fraction"]


def test_detector_and_mask_comparisons_are_exposed():
    world = hand_world()
    fires = torch.zeros(2, 1, SIZE, SIZE)
    fires[1, 0, 4:, 4:] = 1.0
    # threshold = 1.0 exactly: '>' (Lite, the default) keeps nothing, '>=' keeps the square
    strict = dissect_features(fires, world, device="cpu")
    assert strict.units.loc[0, "iou"] == 0.0 and not strict.units.loc[0, "detector"]
    assert dissect_features(fires, world, device="cpu", mask_comparison=">=").units.loc[0, "iou"] == 1.0
    at = dissect_features(fires, world, device="cpu", iou_threshold=1.0, mask_comparison=">=")
    assert bool(at.units.loc[0, "detector"])
    assert not bool(dissect_features(fires, world, device="cpu", iou_threshold=1.0, mask_comparison=">=",
                                     detector_comparison=">").units.loc[0, "detector"])


# ---------------------------------------------------------------- quantiles
@pytest.mark.parametrize("quantile", [0.005, 0.05, 0.3])
@pytest.mark.parametrize("rule", ["exact", "lite"])
def test_thresholds_equal_numpy_quantile(quantile, rule):
    world = random_world(n=5)
    features = torch.randn(5, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    result = dissect_features(features, world, quantile=quantile, quantile_rule=rule, batch_size=2, device="cpu")
    level = quantile_level(quantile, rule)
    values = features.permute(1, 0, 2, 3).reshape(4, -1).double().numpy()
    expected = np.quantile(values, level, axis=1)
    assert np.array_equal(result.thresholds, expected)
    assert result.config["quantile_method"] == "exact" and result.config["quantile_rank_error"] == 0


def test_lite_quantile_index_rule():
    assert quantile_level(0.005, "lite") == 994 / 999
    assert quantile_level(0.005) == 0.995
    with pytest.raises(ValueError, match="quantile must lie"):
        quantile_level(0.0)


def test_sketch_stays_within_its_stated_rank_error():
    world = random_world(n=6)
    features = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)) ** 3
    result = dissect_features(features, world, quantile=0.05, quantile_method="sketch", sketch_capacity=32,
                              batch_size=2, device="cpu")
    n = 6 * 64
    bound = result.config["quantile_rank_error"] * n
    assert result.config["quantile_method"] == "sketch" and 0 < bound < n / 8
    values = np.sort(features.permute(1, 0, 2, 3).reshape(3, -1).double().numpy(), axis=1)
    target = (n - 1) * 0.95
    for unit in range(3):
        below = np.searchsorted(values[unit], result.thresholds[unit], side="left")
        above = np.searchsorted(values[unit], result.thresholds[unit], side="right")
        assert below - 1 - bound <= target <= above + bound, (unit, below, above, target, bound)


# ---------------------------------------------------------------- tally against a brute-force reference
def reference_iou(features, world, thresholds, denominator):
    """Loops over images, units and labels: the definition, without any vectorisation."""
    units, num_labels = features.shape[1], world.num_labels
    inter = np.zeros((units, num_labels))
    active_cat = np.zeros((units, len(CATEGORIES)))
    active = np.zeros(units)
    label_pixels = np.zeros(num_labels)
    for i in range(len(world)):
        item = world[i]
        shrink = features.shape[2] > SIZE or features.shape[3] > SIZE  # PIL-style averaging when shrinking
        up = F.interpolate(features[i : i + 1], size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                           antialias=shrink)[0].double()
        for k in range(units):
            mask = (up[k] > thresholds[k]).numpy()  # Lite: strictly above T_k
            active[k] += mask.sum()
            if denominator == "image":  # the image carries some label of the category
                active_cat[k] += mask.sum() * item["category_present"].numpy()
            else:  # Lite: some active pixel lies on a label of the category, or a whole-image label
                touched = np.zeros(len(CATEGORIES), dtype=bool)
                for label in [*np.unique(item["pixel_labels"].numpy()[:, mask]), *item["image_labels"].tolist()]:
                    if PRIMARY[label] >= 0:
                        touched[PRIMARY[label]] = True
                active_cat[k] += mask.sum() * touched
            for label in range(1, num_labels):
                for plane in item["pixel_labels"].numpy():
                    inter[k, label] += (mask & (plane == label)).sum()
                if label in item["image_labels"].tolist():
                    inter[k, label] += mask.sum()
        for label in range(1, num_labels):
            label_pixels[label] += (item["pixel_labels"].numpy() == label).sum()
            label_pixels[label] += SIZE * SIZE * (label in item["image_labels"].tolist())
    iou = np.full((units, num_labels), np.nan)
    for label in range(1, num_labels):
        if PRIMARY[label] < 0:
            continue
        unit_term = active if denominator == "union" else active_cat[:, PRIMARY[label]]
        denom = unit_term + label_pixels[label] - inter[:, label]
        iou[:, label] = np.where(denom > 0, inter[:, label] / np.maximum(denom, 1), 0)
    return iou


@pytest.mark.parametrize("shape", [(3, 3), (13, 11)])  # upsampled, shrunk
@pytest.mark.parametrize("denominator", ["overlap", "image", "union"])
def test_vectorised_tally_matches_brute_force(denominator, shape):
    world = random_world(n=8, seed=4)
    features = torch.randn(8, 5, *shape, generator=torch.Generator().manual_seed(5))
    result = dissect_features(features, world, quantile=0.1, denominator=denominator, batch_size=3, device="cpu")
    expected = reference_iou(features, world, result.thresholds, denominator)
    assert_close(np.nan_to_num(result.iou, nan=-7), np.nan_to_num(expected, nan=-7), atol=1e-12)
    assert (result.iou[~np.isnan(result.iou)] > 0).any()


# ---------------------------------------------------------------- the model path
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1), nn.Flatten())


def hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_model_dissection_is_deterministic_and_matches_features():
    world = random_world(n=7, seed=6)
    model = tiny_model().train()
    first = dissect(model, "1", world, quantile=0.05, batch_size=3, device="cpu")
    again = dissect(model, "1", world, quantile=0.05, batch_size=3, device="cpu")
    two_pass = dissect(model, "1", world, quantile=0.05, batch_size=3, device="cpu", feature_budget_bytes=0)
    assert two_pass.config["forward_passes"] == 2 and first.config["forward_passes"] == 1
    for other in (again, two_pass):
        pd.testing.assert_frame_equal(first.units, other.units, check_exact=True)
        pd.testing.assert_frame_equal(first.summary, other.summary, check_exact=True)
    assert hook_count(model) == 0 and model.training
    with torch.no_grad():
        features = model[:2](world.images)
    direct = dissect_features(features, world, quantile=0.05, layer="1", batch_size=3, device="cpu")
    pd.testing.assert_frame_equal(first.units, direct.units)  # up to float rounding of batched convolutions
    assert_close(first.image_max, features.amax(dim=(2, 3)), atol=1e-5)


def test_identity_basis_and_permutation_basis():
    world = random_world(n=6, seed=7)
    features = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    plain = dissect_features(features, world, quantile=0.05, device="cpu")
    identity = dissect_features(features, world, quantile=0.05, device="cpu", basis=torch.eye(4))
    pd.testing.assert_frame_equal(plain.units, identity.units)
    order = [2, 0, 3, 1]
    permuted = dissect_features(features, world, quantile=0.05, device="cpu", basis=torch.eye(4)[order])
    expected = plain.units.iloc[order].reset_index(drop=True).assign(unit=np.arange(4))
    pd.testing.assert_frame_equal(permuted.units, expected)
    assert permuted.config["basis_shape"] == [4, 4]


def test_given_thresholds_replace_the_quantile_rule():
    world = random_world(n=6, seed=7)
    features = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    fitted = dissect_features(features, world, quantile=0.05, device="cpu")
    reused = dissect_features(features, world, quantile=0.05, device="cpu", thresholds=fitted.thresholds)
    pd.testing.assert_frame_equal(fitted.units, reused.units)
    assert fitted.config["threshold_source"] == "quantile" and reused.config["threshold_source"] == "given"
    # a detector's own rule w·a > t: threshold t on the basis row w fires where w·a − t > 0 does
    row, cut = torch.tensor([[0.5, -1.0, 0.0, 2.0]]), 0.3
    shifted = torch.cat([features, torch.ones(6, 1, 4, 4)], dim=1)
    by_rule = dissect_features(features, world, device="cpu", basis=row, thresholds=[cut])
    by_zero = dissect_features(shifted, world, device="cpu", basis=torch.cat([row, torch.tensor([[-cut]])], 1),
                               thresholds=[0.0])
    assert np.array_equal(by_rule.counts["intersection"], by_zero.counts["intersection"])
    assert by_rule.units.loc[0, "mask_fraction"] == by_zero.units.loc[0, "mask_fraction"] > 0
    with pytest.raises(ValueError, match="3 thresholds were given for 4 units"):
        dissect_features(features, world, device="cpu", thresholds=[0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="thresholds must be a vector of finite numbers"):
        dissect_features(features, world, device="cpu", thresholds=[[0.0] * 4])


def test_bad_inputs_fail_with_clear_messages():
    world = random_world(n=2)
    features = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        dissect(tiny_model(), "nope", world, device="cpu")
    with pytest.raises(ValueError, match=r"categories \['texture'\] are not in the dataset"):
        dissect_features(features, world, categories=["texture"], device="cpu")
    with pytest.raises(ValueError, match="basis has 2 columns but the layer has 3 channels"):
        dissect_features(features, world, basis=torch.eye(2), device="cpu")
    with pytest.raises(ValueError, match="N = len\\(dataset\\) = 2"):
        dissect_features(torch.zeros(3, 3, 4, 4), world, device="cpu")
    with pytest.raises(ValueError, match="unknown denominator 'plain'"):
        dissect_features(features, world, denominator="plain", device="cpu")
    with pytest.raises(ValueError, match=r"unknown dissection option\(s\) \['treshold'\]"):
        dissect_features(features, world, treshold=0.1, device="cpu")


def test_category_subset_and_save(tmp_path):
    world = hand_world()
    fires = torch.zeros(2, 1, SIZE, SIZE)
    fires[0, 0, :2, :4] = 1.0
    fires[1, 0, 4:, 4:] = 1.0
    objects = dissect_features(fires, world, categories=["object"], quantile=0.25, device="cpu")  # T = 0
    assert objects.units.loc[0, "label"] == "square" and list(objects.summary.category) == ["object", "total"]
    assert "part-label" not in objects.units.columns
    objects.save(tmp_path)
    saved = pd.read_csv(tmp_path / "units.csv")
    assert saved.loc[0, "label"] == "square" and saved.loc[0, "iou"] == pytest.approx(16 / 24)
    assert set(pd.read_csv(tmp_path / "iou.csv").columns) == {"unit", "disk", "square"}
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "dissection.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", [(3, 3), (13, 11)])  # upsampled, shrunk (antialiased)
def test_cuda_matches_cpu(shape):
    world = random_world(n=8, seed=9)
    features = torch.randn(8, 5, *shape, generator=torch.Generator().manual_seed(10))
    cpu = dissect_features(features, world, quantile=0.1, device="cpu")
    gpu = dissect_features(features, world, quantile=0.1, device="cuda")
    pd.testing.assert_frame_equal(cpu.units, gpu.units)


# ---------------------------------------------------------------- end to end on the Broden-format fixture
def test_end_to_end_on_broden_fixture(tmp_path):
    from replication.data.broden import BrodenDataset
    from tests.broden_fixture import write_tiny_broden

    truth = write_tiny_broden(tmp_path / "broden", n_images=12, image_size=32, seed=0)
    dataset = BrodenDataset(truth.root)
    rows = truth.rows()
    assert len(rows) == len(dataset)
    disk = torch.stack([torch.as_tensor((truth.pixel_labels(im) == 10).any(0), dtype=torch.float32) for im in rows])
    indoor = torch.tensor([50 in truth.image_labels(im) for im in rows], dtype=torch.float32)
    features = torch.stack([disk, indoor[:, None, None].expand_as(disk)], dim=1)
    result = dissect_features(features, dataset, quantile=0.5, batch_size=5, device="cpu")  # T = 0
    assert result.units.label.tolist() == ["disk", "indoor"]
    assert result.units.iou.tolist() == [1.0, 1.0]
    assert result.units.category.tolist() == ["object", "scene"]
    assert result.unique_detectors == 2
    # the model path through the real loader: a random conv net, two runs identical
    model = tiny_model()
    first = dissect(model, "1", dataset, batch_size=5, device="cpu")
    second = dissect(model, "1", dataset, batch_size=5, device="cpu")
    pd.testing.assert_frame_equal(first.units, second.units, check_exact=True)
    assert first.config["feature_shape"] == [6, 16, 16] and first.config["mask_size"] == [16, 16]


def test_figures_and_unit_label_table():
    import matplotlib.pyplot as plt

    from replication.analysis.dissection_figures import plot_detectors_per_category, plot_top_images, unit_label_table

    world = random_world()
    features = torch.zeros(len(world), 2, SIZE, SIZE)
    for i in range(len(world)):
        features[i, 0] = torch.as_tensor(world.planes[i][1] == 3, dtype=torch.float32)
    features[:, 1] = 0.5 * torch.rand(len(world), SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    result = dissect_features(features, world, quantile=0.3, device="cpu")  # T = 0 for the indicator
    table = unit_label_table(result)
    assert table.loc[0, "unit"] == 0 and table.loc[0, "label"] == "square" and table.loc[0, "iou"] == 1.0
    bars = plot_detectors_per_category(result)
    assert [t.get_text() for t in bars.axes[0].get_xticklabels()] == CATEGORIES
    grid = plot_top_images(result, world, [0, 1], features=features, top_k=3, device="cpu")
    assert len(grid.axes) == 6
    with pytest.raises(ValueError, match="exactly one of model="):
        plot_top_images(result, world, [0], device="cpu")
    plt.close(bars)
    plt.close(grid)


def test_random_rotation_destroys_planted_axis_alignment():
    from replication.analysis.rotation import fractional_rotation, random_rotation

    world = random_world(n=8, seed=11)
    generator = torch.Generator().manual_seed(12)
    features = 0.5 * torch.rand(len(world), 6, SIZE, SIZE, generator=generator)  # units 3-5: distractors
    for i in range(len(world)):
        for unit, label in enumerate([2, 3, 4]):  # disk, square, top: exact indicators
            features[i, unit] = torch.as_tensor((world.planes[i] == label).any(0), dtype=torch.float32)
    ties = dict(mask_comparison=">=")  # the 0/1 indicators tie at T = 1: '>=' keeps each one whole
    natural = dissect_features(features, world, device="cpu", **ties)
    assert natural.units.label[:3].tolist() == ["disk", "square", "top"] and (natural.units.iou[:3] == 1).all()
    rotation = random_rotation(6, seed=0)
    rotated = dissect_features(features, world, device="cpu", basis=rotation)  # rotated directions: no ties
    best = np.nanmax(rotated.iou[:, [2, 3, 4]], axis=0)
    assert (best < 0.5).all(), best
    identity = dissect_features(features, world, device="cpu", basis=fractional_rotation(rotation, 0.0), **ties)
    pd.testing.assert_frame_equal(identity.units, natural.units, check_exact=True)


def test_scene_only_dataset_without_pixel_planes():
    world = PlantedBroden([np.zeros((0, SIZE, SIZE), dtype=np.int64)] * 3, [[6], [], [6]])
    features = torch.zeros(3, 1, SIZE, SIZE)
    features[[0, 2]] = 1.0
    result = dissect_features(features, world, quantile=0.7, device="cpu")  # T = 0 < the scene images' 1s
    assert result.units.loc[0, "label"] == "beach" and result.units.loc[0, "iou"] == 1.0
