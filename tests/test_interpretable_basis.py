"""Paper 04's package: UIBE's losses by hand, its orthonormal basis and stopping rule, IBD's probes on a
planted concept, S¹/S² (closed forms = integrals; Network Dissection's counts at ξ = 0.04) and the
planted test of shared spec section 9."""
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from replication.analysis.dissection import DissectionConfig, dissect_features
from replication.data.broden import BrodenDataset
from replication.methods import interpretable_basis as ib
from tests.helpers import assert_close
from tests.test_dissection import SIZE, random_world

LOG2 = math.log(2)


# ---------------------------------------------------------------- UIBE's losses, by hand
def test_losses_at_equal_logits_are_log2_i_and_one_bit():
    terms = ib.uibe_losses(torch.zeros(5, 4), torch.tensor(2.0), ib.UIBEConfig())
    assert_close(terms["sparsity"], 2.0)  # q uniform over 4 directions
    assert_close(terms["activation"], 1.0)  # −Σ q log2(1/2)
    assert_close(terms["margin"], 0.5)
    assert_close(terms["total"], 2.6 * 2.0 + 2.8 * 1.0 + 0.6 * 0.5)
    assert "inactive" not in terms and ib.UIBEConfig().is_uibe


def test_losses_on_two_directions_by_hand():
    # y = (3/4, 1/2): q = (0.6, 0.4)
    terms = ib.uibe_losses(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor(1.0), ib.UIBEConfig())
    assert_close(terms["sparsity"], -(0.6 * math.log2(0.6) + 0.4 * math.log2(0.4)))
    assert_close(terms["activation"], 0.6 * math.log2(4 / 3) + 0.4 * 1.0)
    # one direction dominating: no entropy and nothing left to push
    sharp = ib.uibe_losses(torch.tensor([[30.0, -30.0, -30.0]]), torch.tensor(1.0), ib.UIBEConfig())
    assert_close(sharp["sparsity"], 0.0, atol=1e-6) and assert_close(sharp["activation"], 0.0, atol=1e-6)


def test_inactive_classifier_loss_is_an_extension_off_by_default():
    config = ib.UIBEConfig(inactive_weight=1.0, inactive_tau=0.9, inactive_gamma=1.1)
    assert not config.is_uibe
    # direction 0 used (y^1.1 = 0.75^1.1 > ν = 0.45), direction 1 dead: (1/ν)·ν = 1; mean over 2 = 0.5
    terms = ib.uibe_losses(torch.tensor([[math.log(3.0), -60.0]]), torch.tensor(1.0), config)
    assert_close(terms["inactive"], 0.5)
    plain = ib.uibe_losses(torch.tensor([[math.log(3.0), -60.0]]), torch.tensor(1.0), ib.UIBEConfig())
    assert_close(terms["total"] - plain["total"], 0.5)


# ---------------------------------------------------------------- features and detectors
def test_pixel_matrix_order_and_standardizer():
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    pixels = ib.pixel_matrix(features)
    assert pixels.shape == (8, 3)
    assert torch.equal(pixels[1 * 4 + 1 * 2 + 0], features[1, :, 1, 0])  # image 1, row 1, column 0
    data = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    scaler = ib.Standardizer.fit(data)
    assert_close(scaler.mean, [2.0, 5.0]) and assert_close(scaler.std, [1.0, 1.0])  # constant dim keeps std 1
    assert_close(scaler(data), [[-1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="N × D × h × w"):
        ib.pixel_matrix(torch.zeros(3, 4))


def hand_basis() -> ib.UIBEBasis:
    directions = torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    scaler = ib.Standardizer(torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 4.0]))
    return ib.UIBEBasis(directions, bias=0.3, margin=0.25, standardizer=scaler, config=ib.UIBEConfig(), seed=0,
                        restart=0, restart_losses=[0.0], history=pd.DataFrame())


def test_uibe_detectors_are_its_logits_in_the_original_space():
    basis = hand_basis()
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    logits = basis.logits(x.float(), batch_size=7, device="cpu")
    assert_close(basis.detectors().scores(x), basis.margin * logits.double(), atol=1e-5)  # w·x − t = M z
    x0 = torch.tensor([[3.0, -2.0, 0.5]])  # x̃ = (1, 0, 0): z_0 = (0.6 − 0.3) / 0.25
    assert_close(basis.logits(x0, device="cpu"), [[1.2, -1.2]])
    original = basis.original_directions()
    assert_close(original[0], torch.tensor([0.3, 1.6, 0.0]) / math.hypot(0.3, 1.6))


def test_detector_dissection_equals_thresholding_the_logit_maps_at_zero():
    world = random_world(n=6, seed=2)
    features = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    basis = hand_basis()
    logit_maps = basis.logits(ib.pixel_matrix(features), device="cpu").reshape(6, 4, 4, 2).permute(0, 3, 1, 2)
    by_rule = dissect_features(features, world, device="cpu", **basis.detectors().dissect_keywords())
    by_logit = dissect_features(logit_maps, world, device="cpu", thresholds=[0.0, 0.0])
    assert np.array_equal(by_rule.counts["unit_total"], by_logit.counts["unit_total"])
    assert np.array_equal(by_rule.counts["intersection"], by_logit.counts["intersection"])
    assert by_rule.counts["unit_total"].min() > 0


# ---------------------------------------------------------------- UIBE training
def test_basis_stays_orthonormal_and_the_lowest_loss_restart_is_kept():
    data = ib.planted_basis_data(300, 10, seed=4)
    config = ib.UIBEConfig(directions=3, batch_size=64, lr=0.05, epochs=8, restarts=3)
    fitted = ib.fit_uibe(data.train, config, seed=5, device="cpu")
    u = fitted.directions
    assert u.shape == (3, 16)
    assert_close(u @ u.T, torch.eye(3), atol=1e-5)
    assert fitted.margin > 0
    assert fitted.restart == int(np.argmin(fitted.restart_losses)) and len(set(fitted.restart_losses)) == 3
    assert sorted(fitted.history.restart.unique()) == [0, 1, 2]
    assert fitted.settings()["seed"] == 5 and fitted.settings()["restart"] == fitted.restart and fitted.settings()["is_uibe"]
    again = ib.fit_uibe(data.train, config, seed=5, device="cpu")
    assert torch.equal(again.directions, fitted.directions)  # seeded
    assert not torch.equal(ib.fit_uibe(data.train, config, seed=6, device="cpu").directions, fitted.directions)


def test_restarts_in_worker_processes_give_the_serial_fit():
    data = ib.planted_basis_data(200, 10, seed=2)
    config = ib.UIBEConfig(directions=3, batch_size=50, lr=0.05, epochs=4, restarts=3)
    serial = ib.fit_uibe(data.train, config, seed=1, device="cpu")
    parallel = ib.fit_uibe(data.train, config, seed=1, device="cpu", workers=2)
    assert torch.equal(parallel.directions, serial.directions)
    assert parallel.restart_losses == serial.restart_losses and parallel.restart == serial.restart
    pd.testing.assert_frame_equal(parallel.history, serial.history)
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        ib.fit_uibe(data.train, config, device="cpu", workers=0)


def test_stopping_rule_ends_after_the_stated_number_of_halvings():
    # every weight 0: the loss is flat, so with patience and cooldown 0 every epoch after the first halves lr
    config = ib.UIBEConfig(directions=2, sparsity_weight=0, activation_weight=0, margin_weight=0, epochs=50,
                           plateau_patience=0, plateau_cooldown=0, stop_halvings=2, batch_size=8)
    fitted = ib.fit_uibe(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), config, device="cpu")
    assert fitted.history.lr.tolist() == [1e-3, 1e-3, 5e-4]


def test_planted_samples_carry_exactly_one_concept():
    config = ib.PlantedConfig()
    raw, concept = ib.planted_samples(500, config, np.random.default_rng(0))
    present = raw[:, :3] - config.offset >= 2.5
    assert (present.sum(1) == 1).all() and (present.argmax(1) == concept).all()
    data = ib.planted_basis_data(20, 10, config, seed=1)
    assert_close(data.train.double() @ data.rotation, torch.from_numpy(ib.planted_samples(20, config, np.random.default_rng(1))[0]),
                 atol=1e-4)
    assert_close(data.directions @ data.directions.T, torch.eye(3), atol=1e-12)


def test_uibe_recovers_the_planted_concepts_that_the_axes_miss():
    data = ib.planted_basis_data(600, 2000, seed=0)
    config = ib.UIBEConfig(directions=3, batch_size=100, lr=0.03, epochs=40, restarts=8)
    result = ib.planted_test(data, config, seed=0, device="cpu")
    table = result.table.set_index("basis")
    assert table.loc["UIBE", "min_iou"] >= 0.90  # the spec's pass criterion, on held-out samples
    assert table.loc["natural basis (oracle thresholds)", "min_iou"] < 0.8
    assert table.loc["random rotation (oracle thresholds)", "min_iou"] < 0.8
    assert 0.5 < table.loc["UIBE", "abs_cos_min"] < 0.8  # UIBE finds the centred directions, not the raw ones


# ---------------------------------------------------------------- detection IoUs
def test_detection_and_oracle_ious_by_hand():
    truth = torch.tensor([[True], [False], [True], [False]])
    fires = torch.tensor([[True, False], [True, False], [False, False], [False, False]])
    assert_close(ib.detection_iou(fires, truth), [[1 / 3], [0.0]])
    scores = torch.tensor([[0.9], [0.8], [0.1], [0.05]])  # top-j IoUs 1/2, 1/3, 2/3, 1/2
    assert_close(ib.best_threshold_iou(scores, truth), [[2 / 3]])
    iou = np.array([[0.1, 0.9], [0.8, 0.2], [0.0, 0.0]])
    assert ib.match_detectors(iou).tolist() == [1, 0] and ib.matched_iou(iou).tolist() == [0.8, 0.9]
    with pytest.raises(ValueError, match="cannot be matched"):
        ib.matched_iou(np.zeros((1, 2)))


def test_shuffled_pixels_keep_each_dimension_and_break_the_joint_structure():
    pixels = torch.arange(2000, dtype=torch.float32).reshape(1000, 2)  # the two dimensions move together
    shuffled = ib.shuffled_pixels(pixels, seed=0)
    for d in range(2):
        assert torch.equal(shuffled[:, d].sort().values, pixels[:, d])
    assert abs(float(torch.corrcoef(shuffled.T)[0, 1])) < 0.1 and float(torch.corrcoef(pixels.T)[0, 1]) == pytest.approx(1)
    assert torch.equal(ib.shuffled_pixels(pixels, seed=0), shuffled)


def test_one_hotness_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [60.0, -60.0, -60.0], [60.0, 60.0, -60.0], [-60.0, -60.0, -60.0]])
    result = ib.one_hotness(logits)
    # q: uniform (log2 3 bits), one-hot (0), two halves (1 bit), three equal tiny y's: uniform again (log2 3)
    assert_close(result["mean_entropy_bits"], (2 * math.log2(3) + 1) / 4, atol=1e-6)
    assert result["one_hot_share"] == 0.25 and result["none_active_share"] == 0.5
    assert result["dead_directions"] == 1 and result["max_entropy_bits"] == math.log2(3)
    assert_close(result["active_share"], (0 + 1 + 2 + 0) / 12)


# ---------------------------------------------------------------- S¹ and S²
def table_of(labels, val_iou) -> pd.DataFrame:
    return pd.DataFrame({"label_number": labels, "val_iou": val_iou, "category": ["c"] * len(labels)})


def test_s_scores_by_hand():
    table = table_of([2, 2, 3, -1, 5], [0.3, 0.5, 0.04, 0.0, 0.0])
    assert_close([ib.s_scores(table)["s1"], ib.s_scores(table)["s2"]], [0.84, 0.54], atol=1e-12)
    assert ib.s_integrands(table, 0.04) == {"detectors": 3, "unique_detectors": 2}
    assert ib.s_integrands(table, 0.4) == {"detectors": 1, "unique_detectors": 1}
    assert ib.s_integrands(table, 0.0) == {"detectors": 4, "unique_detectors": 3}  # the unlabelled one never counts


def test_closed_forms_equal_the_integrals():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 12))
        values = np.round(rng.random(n), 1)  # rounded: ties between directions and labels
        table = table_of(rng.integers(-1, 4, n), values)
        table.loc[table.label_number < 0, "val_iou"] = 0.0
        closed, exact = ib.s_scores(table), ib.integrated_scores(table)
        assert_close([exact["s1"], exact["s2"]], [closed["s1"], closed["s2"]], atol=1e-12)
        grid = (np.arange(500) + 0.5) / 500  # midpoint rule: off by at most one step per direction
        counts = pd.DataFrame([ib.s_integrands(table, xi) for xi in grid])
        assert_close(counts.mean().tolist(), [closed["s1"], closed["s2"]], atol=n / 500)
        assert closed["s1"] >= closed["s2"] - 1e-12


def planted_features(world, seed: int) -> torch.Tensor:
    """Indicator maps of the square and the disk plus noise channels, at mask resolution."""
    features = torch.rand(len(world), 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 0.5
    for i in range(len(world)):
        features[i, 0] += torch.as_tensor(world.planes[i][1] == 3, dtype=torch.float32)
        features[i, 1] += torch.as_tensor(world.planes[i][1] == 2, dtype=torch.float32)
    return features


def test_s_integrands_at_the_detector_threshold_are_network_dissections_counts():
    world = random_world(n=12, seed=3)
    features = planted_features(world, seed=4)
    config = DissectionConfig(batch_size=5, split=None, quantile=0.2)
    scores = ib.score_basis("natural", features, features, world, world, config=config, device="cpu")
    summary = scores.train.summary.set_index("category").loc["total"]
    assert summary.detectors >= 2  # the planted units
    assert ib.s_integrands(scores.table, 0.04) == {"detectors": summary.detectors,
                                                   "unique_detectors": summary.unique_detectors}
    rotated = ib.score_basis("rotation", features, features, world, world, config=config, device="cpu",
                             basis=torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))[0])
    rotated_summary = rotated.train.summary.set_index("category").loc["total"]
    assert ib.s_integrands(rotated.table, 0.04)["unique_detectors"] == rotated_summary.unique_detectors
    assert (scores.table.label == scores.train.units.label).all()


def test_labels_on_train_and_scores_on_val_with_the_train_thresholds():
    train, val = random_world(n=12, seed=3), random_world(n=12, seed=5)
    config = DissectionConfig(batch_size=5, split=None, quantile=0.2)
    scores = ib.score_basis("natural", planted_features(train, 4), planted_features(val, 6), train, val,
                            config=config, device="cpu")
    assert np.array_equal(scores.val.thresholds, scores.train.thresholds)
    assert scores.val.config["threshold_source"] == "given"
    table = scores.table
    assert table.loc[0, "label"] == "square" and table.loc[1, "label"] == "disk"
    assert table.loc[0, "val_iou"] == scores.val.iou[0, 3] and table.loc[0, "train_iou"] == scores.train.iou[0, 3]
    assert table.loc[0, "category"] == "object"
    by_category = scores.by_category.set_index("category")
    assert_close(by_category.loc["total", "s1"], by_category.drop("total").s1.sum(), atol=1e-12)  # additive
    fixed = ib.score_basis("fixed", planted_features(train, 4), planted_features(val, 6), train, val, config=config,
                           device="cpu", labels=[2, 3, -1, -1])  # swapped on purpose
    assert fixed.table.label.tolist() == ["disk", "square", "", ""] and fixed.scores["s1"] < scores.scores["s1"]


# ---------------------------------------------------------------- IBD
def test_cell_labels_sample_each_cells_centre_and_fill_whole_image_labels():
    world = random_world(n=3, seed=0)
    cells = ib.cell_labels(world, (4, 4), batch_size=2)
    assert cells.shape[0] == 3 * 16
    for i in range(3):
        planes = world.planes[i]
        for r in range(4):
            for c in range(4):
                row = set(cells[i * 16 + r * 4 + c].tolist()) - {0}
                expected = {int(p[2 * r + 1, 2 * c + 1]) for p in planes} - {0}
                assert row == expected | set(world.scenes[i])


def test_ibd_recovers_a_planted_linear_concept():
    world = random_world(n=24, seed=1)
    cells = ib.cell_labels(world, (4, 4), batch_size=8)
    generator = torch.Generator().manual_seed(2)
    direction = torch.tensor([1.0, -1.0, 2.0, 0.0, -2.0, 0.0]) / math.sqrt(10)  # zero mean: centring keeps it
    square = (cells == 3).any(dim=1)
    pixels = torch.randn(len(cells), 6, generator=generator) * 0.3 + 3.0 * square[:, None] * direction
    fitted = ib.fit_ibd(pixels, cells, world, ib.IBDConfig(categories=("object",), lr=0.5), seed=0, device="cpu")
    assert set(fitted.names) == {"disk", "square"} and fitted.settings()["concepts"] == 2
    k = fitted.names.index("square")
    assert fitted.positives[k] == int(square.sum())
    fires = fitted.detectors().scores(pixels.double())[:, k] > 0
    assert ib.detection_iou(fires[:, None], square[:, None])[0, 0] > 0.95
    basis = fitted.basis()
    assert_close(basis.norm(dim=1), torch.ones(2)) and assert_close(basis.mean(dim=1), torch.zeros(2), atol=1e-12)
    assert float(basis[k] @ direction.double()) > 0.9
    detectors = fitted.detectors()
    assert_close(detectors.threshold, -fitted.bias.double())  # the uncentred probe's own rule


def test_ibd_refuses_other_splits_and_empty_concepts():
    world = random_world(n=4, seed=1)
    cells = ib.cell_labels(world, (4, 4), batch_size=4)
    pixels = torch.randn(len(cells), 3)
    world.split = "val"
    with pytest.raises(ValueError, match="IBD trains on the train split only"):
        ib.fit_ibd(pixels, cells, world, device="cpu")
    world.split = "train"
    with pytest.raises(ValueError, match=r"IBD categories \['texture'\] are not in the dataset"):
        ib.fit_ibd(pixels, cells, world, ib.IBDConfig(categories=("texture",)), device="cpu")
    with pytest.raises(ValueError, match="one row per cell"):
        ib.fit_ibd(pixels[:-1], cells, world, device="cpu")


# ---------------------------------------------------------------- bad input, CUDA
def test_bad_inputs_fail_with_clear_messages():
    with pytest.raises(ValueError, match="bad UIBEConfig: batch_size must be >= 1; got 0; orthogonal_map must be one of"):
        ib.UIBEConfig(batch_size=0, orthogonal_map="qr")
    with pytest.raises(ValueError, match="exceeds the feature dimension D = 4"):
        ib.fit_uibe(torch.randn(10, 4), ib.UIBEConfig(directions=5), device="cpu")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ib.fit_uibe(torch.full((10, 4), math.nan), device="cpu")
    with pytest.raises(ValueError, match="epoch_negatives .* cannot exceed negative_pool"):
        ib.IBDConfig(negative_pool=1, epoch_negatives=2)
    with pytest.raises(ValueError, match="K × D weight, K thresholds and K names"):
        ib.LinearDetectors(torch.zeros(2, 3), torch.zeros(3), ("a", "b"))
    world = random_world(n=4)
    features = torch.zeros(4, 2, SIZE, SIZE)
    with pytest.raises(ValueError, match="either detectors .* or basis"):
        ib.score_basis("x", features, features, world, world, config=DissectionConfig(batch_size=2), device="cpu",
                       basis=torch.eye(2), detectors=ib.LinearDetectors(torch.eye(2).double(), torch.zeros(2).double(), ("a", "b")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_uibe_and_ibd_on_cuda_match_cpu():
    data = ib.planted_basis_data(200, 10, seed=4)
    config = ib.UIBEConfig(directions=3, batch_size=64, lr=0.05, epochs=3)
    cpu, gpu = (ib.fit_uibe(data.train, config, device=d) for d in ("cpu", "cuda"))
    assert_close(gpu.directions, cpu.directions, atol=1e-3)
    world = random_world(n=8, seed=1)
    cells = ib.cell_labels(world, (4, 4), batch_size=8)
    pixels = torch.randn(len(cells), 5, generator=torch.Generator().manual_seed(0))
    a, b = (ib.fit_ibd(pixels, cells, world, ib.IBDConfig(categories=("object",), epochs=2), device=d)
            for d in ("cpu", "cuda"))
    assert_close(b.weight, a.weight, atol=1e-4)


def test_a_fixed_basis_keeps_its_directions_and_fits_only_the_shared_bias_and_margin():
    pixels = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    config = ib.UIBEConfig(batch_size=16, lr=0.05, epochs=5, restarts=4)
    fitted = ib.fit_uibe(pixels, config, device="cpu", basis=rotation)
    assert torch.equal(fitted.directions, rotation.float())
    assert len(fitted.restart_losses) == 1 and (fitted.bias != 0 or fitted.margin != 1)
    with pytest.raises(ValueError, match="orthonormal rows"):
        ib.fit_uibe(pixels, config, device="cpu", basis=2 * rotation)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_compare_bases_on_a_tiny_world(tiny_world):
    train, val = BrodenDataset(tiny_world, split="train"), BrodenDataset(tiny_world, split="val")
    torch.manual_seed(0)
    data = ib.layer_data(TinyNet(), "relu", train, val, batch_size=4, device="cpu")
    result = ib.compare_bases(data, train, val, config=DissectionConfig(batch_size=4, quantile=0.05),
                              uibe=ib.UIBEConfig(batch_size=256, lr=0.01, epochs=2),
                              ibd=ib.IBDConfig(epochs=2), seed=0, device="cpu")
    table = result.table.set_index("basis")
    assert list(table.index) == ["natural", "random rotation", "UIBE", "IBD"]
    assert (table.directions[["natural", "random rotation", "UIBE"]] == 6).all()
    assert table.loc["IBD", "directions"] == len(result.ibd.labels) > 0
    assert (table.s1 >= table.s2 - 1e-12).all()
    ibd_scores = result.scores["IBD"]
    assert ibd_scores.table.label_number.tolist() == result.ibd.labels.tolist()  # each probe keeps its concept
    assert ibd_scores.train.config["threshold_source"] == "given"
    assert np.array_equal(result.scores["random rotation"].val.thresholds, result.scores["random rotation"].train.thresholds)
    assert list(result.one_hot.basis) == ["natural", "random rotation", "UIBE", "IBD", ib.SHUFFLED]
    assert result.one_hot.one_hot_share.between(0, 1).all()



def test_run_comparisons_over_seeds_and_the_notebook_tables(tiny_world):
    train, val = BrodenDataset(tiny_world, split="train"), BrodenDataset(tiny_world, split="val")
    torch.manual_seed(0)
    model = TinyNet()
    network = ib.SubjectNetwork("tiny", model, "relu", train, val, "random init")
    data = {"tiny": ib.layer_data(model, "relu", train, val, batch_size=4, device="cpu")}
    settings = ib.UIBESettings(networks=("tiny",), layers={"tiny": "relu"}, seeds=(0, 1),
                               fit=ib.UIBEConfig(batch_size=256, lr=0.01, epochs=2), ibd=ib.IBDConfig(epochs=1))
    config = DissectionConfig(batch_size=4, quantile=0.05)
    result = ib.run_comparisons({"tiny": network}, data, settings, config=config, device="cpu")
    assert sorted(result.runs) == [("tiny", 0), ("tiny", 1)]
    assert len(result.scores) == 8 and len(result.one_hot) == 10 and set(result.scores.seed) == {0, 1}
    summary = ib.seed_summary(result.scores, ["s1", "s2"])
    assert list(summary.index.get_level_values("basis")) == ["natural", "random rotation", "UIBE", "IBD"]
    assert summary.loc[("tiny", "natural"), ("s1", "std")] == 0  # the natural basis does not depend on the seed
    check = ib.metric_reduction_check(result, {"tiny": network}, xi=config.iou_threshold)
    assert len(check) == 8 and check.equal.all()
    found = ib.concepts_found(result.runs["tiny", 0], xi=0.0)
    assert set(found.found_by) <= {"both", "UIBE only", "IBD only"} and len(found) > 0
    table = ib.network_table({"tiny": network}, data)
    assert table.loc[0, "dim"] == 6 and table.loc[0, "train_images"] == len(train)
    sensitivity = ib.directions_sensitivity(data["tiny"], settings.fit, [2, None], device="cpu")
    assert sensitivity.directions.tolist() == [2, 6] and sensitivity.active_share.between(0, 1).all()

def test_figures_draw_the_integrands_whose_areas_are_s1_and_s2():
    table = table_of([2, 2, 3, -1, 5], [0.3, 0.5, 0.04, 0.0, 0.0])
    fake = ib.BasisScores("hand", None, None, table, ib.s_scores(table), pd.DataFrame())
    fig = ib.plot_threshold_curves({"hand": fake})
    solid, dashed = fig.axes[0].lines[:2]
    for line, key in ((solid, "s1"), (dashed, "s2")):
        x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert_close(np.sum(np.diff(x) * y[1:]), ib.s_scores(table)[key], atol=1e-12)  # "pre" steps: y[i] on (x[i-1], x[i]]
    bars = ib.plot_scores(pd.DataFrame({"basis": ["a", "a", "b"], "s1": [1.0, 3.0, 2.0], "s2": [1.0, 1.0, 0.5]}))
    heights = [patch.get_height() for patch in bars.axes[0].patches]
    assert heights == [2.0, 2.0, 1.0, 0.5]  # S¹ means of a and b, then S² means
    plt.close("all")
