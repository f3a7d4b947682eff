"""Validity and faithfulness metrics: known answers on constructed maps, and Quantus's values on the same inputs."""
import numpy as np
import pytest
import torch
from torch import nn

from replication.analysis import localisation as loc

quantus = pytest.importorskip("quantus")


def _masks():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 2:5, 2:5] = True
    masks[1, :, :4] = True
    masks[2, 6:, 6:] = True
    return masks


def test_a_map_equal_to_the_mask_scores_one_and_its_complement_zero():
    masks = _masks()
    maps = masks.float()
    assert loc.pointing_game(maps, masks).tolist() == [1.0, 1.0, 1.0]
    assert loc.energy_in_mask(maps, masks).tolist() == [1.0, 1.0, 1.0]
    assert loc.pixel_auroc(maps, masks).tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(loc.top_fraction_iou(maps, masks, fraction=9 / 64)[0], torch.tensor(1.0))
    flipped = 1 - maps
    assert loc.energy_in_mask(flipped, masks).tolist() == [0.0, 0.0, 0.0]
    assert loc.pixel_auroc(flipped, masks).tolist() == [0.0, 0.0, 0.0]
    assert loc.pixel_auroc(torch.ones(3, 8, 8), masks).tolist() == [0.5, 0.5, 0.5]  # all ties: chance
    empty = torch.zeros(1, 8, 8, dtype=torch.bool)
    assert np.isnan(loc.pointing_game(torch.rand(1, 8, 8), empty).item())


def test_pointing_game_tolerance_counts_a_near_miss():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 4, 4] = True
    maps = torch.zeros(1, 8, 8)
    maps[0, 4, 6] = 1.0
    assert loc.pointing_game(maps, masks).item() == 0.0
    assert loc.pointing_game(maps, masks, tolerance=2).item() == 1.0


def test_pointing_game_scores_the_share_of_tied_maxima_in_the_mask_and_nan_for_a_constant_map():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True  # the top-left quarter
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = maps[0, 3, 3] = maps[0, 3, 0] = maps[0, 0, 3] = 1.0  # 4 tied maxima, one in the mask
    maps[1, :2, :3] = 1.0  # 6 tied maxima, 4 in the mask
    maps[2] = 0.5  # constant: it points nowhere
    scores = loc.pointing_game(maps, masks)
    torch.testing.assert_close(scores[:2], torch.tensor([0.25, 4 / 6]))
    assert np.isnan(scores[2].item())
    assert loc.constant_maps(maps).tolist() == [False, False, True]
    # dilated by one pixel (rows and columns 0-2): every tied maximum of map 1, still one corner of map 0
    torch.testing.assert_close(loc.pointing_game(maps, masks, tolerance=1)[:2], torch.tensor([0.25, 1.0]))


def test_random_map_expectation_is_exact_and_matches_many_random_draws():
    masks = _masks()
    expected = loc.random_map_expectation(masks)
    share = torch.tensor([9 / 64, 32 / 64, 4 / 64])
    torch.testing.assert_close(expected["pointing"], share)
    torch.testing.assert_close(expected["energy"], share)
    assert expected["auroc"].tolist() == [0.5, 0.5, 0.5]
    torch.testing.assert_close(loc.random_map_expectation(masks, tolerance=1)["pointing"][2], torch.tensor(9 / 64))
    draws = torch.rand(3000, 8, 8, generator=torch.Generator().manual_seed(0))  # 1000 random maps per mask
    for name, metric in (("pointing", loc.pointing_game), ("energy", loc.energy_in_mask), ("auroc", loc.pixel_auroc)):
        mean = metric(draws, masks.repeat_interleave(1000, 0)).view(3, 1000).mean(1)
        torch.testing.assert_close(mean, expected[name], rtol=0, atol=0.04)
    assert np.isnan(loc.random_map_expectation(torch.zeros(1, 4, 4, dtype=torch.bool))["pointing"].item())


def test_validity_metrics_equal_quantus_on_shared_inputs():
    generator = torch.Generator().manual_seed(0)
    masks = _masks()
    maps = torch.rand(3, 8, 8, generator=generator)
    maps[1, 0, :3] = maps[1, 0, 3]  # ties for the AUROC (not at the maximum: there our pointing rule differs)
    assert (maps.flatten(1) == maps.flatten(1).amax(1, keepdim=True)).sum(1).tolist() == [1, 1, 1]
    a, s = maps[:, None].numpy(), masks[:, None].numpy().astype(float)
    x, y = np.zeros((3, 3, 8, 8), dtype=np.float32), np.zeros(3, dtype=int)
    common = dict(normalise=False, abs=False, disable_warnings=True)
    for ours, theirs in ((loc.pointing_game, quantus.PointingGame(**common)),
                         (loc.energy_in_mask, quantus.RelevanceMassAccuracy(**common)),
                         (loc.pixel_auroc, quantus.AUC(**common))):
        expected = theirs(model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s, channel_first=True)
        np.testing.assert_allclose(ours(maps, masks).numpy(), np.asarray(expected, dtype=float), rtol=1e-6)


class Tiny(nn.Module):
    """A hand-weighted classifier: class 0's logit is the mean of the centre 4 × 4 pixels' first channel."""

    def forward(self, x):
        centre = x[:, 0, 2:6, 2:6].mean((1, 2))
        return torch.stack([4 * centre, torch.zeros_like(centre)], 1)


def test_deletion_of_the_evidence_first_drops_the_probability_first():
    images = torch.zeros(2, 3, 8, 8)
    images[:, 0, 2:6, 2:6] = 2.0
    right = torch.zeros(2, 8, 8)
    right[:, 2:6, 2:6] = 1.0 + torch.arange(16.0).view(4, 4) / 16
    wrong = 1 - right.clamp(max=1)
    target = torch.zeros(2, dtype=torch.long)
    fast = loc.perturbation_curves(Tiny(), images, right, target=target, steps=4, device="cpu")
    slow = loc.perturbation_curves(Tiny(), images, wrong, target=target, steps=4, device="cpu")
    p = torch.sigmoid(torch.tensor(8.0))
    torch.testing.assert_close(fast[0], torch.tensor([p, 0.5, 0.5, 0.5, 0.5]))  # the 16 evidence pixels go first
    assert (loc.curve_auc(fast) < loc.curve_auc(slow)).all()
    inserted = loc.perturbation_curves(Tiny(), images, right, target=target, mode="insertion", steps=4, device="cpu")
    torch.testing.assert_close(inserted[:, -1], torch.full((2,), p.item()))
    torch.testing.assert_close(loc.curve_auc(torch.tensor([[0.0, 1.0, 1.0]])), torch.tensor([0.75]))


def test_removal_order_is_built_on_the_maps_device():
    maps = torch.tensor([[[0.2, 0.9], [0.9, 0.1]]])
    assert loc.removal_rank(maps).flatten().tolist() == [2, 0, 1, 3]  # ties by position
    assert loc.removal_rank(maps.to("meta")).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_perturbation_curves_and_blur_run_on_cuda_images():
    images = torch.zeros(2, 3, 8, 8)
    images[:, 0, 2:6, 2:6] = 2.0
    maps, target = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(loc.blurred(images.cuda()).cpu(), loc.blurred(images))
    for mode in loc.MODES:
        on_cpu = loc.perturbation_curves(Tiny(), images, maps, mode=mode, target=target, steps=4, device="cpu")
        on_cuda = loc.perturbation_curves(Tiny(), images.cuda(), maps, mode=mode, target=target, steps=4, device="cuda")
        torch.testing.assert_close(on_cuda, on_cpu)


def test_deletion_curve_equals_quantus_pixel_flipping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(4, 3, 8, 8)
    maps = torch.rand(4, 8, 8)
    target = model(images).argmax(1)
    ours = loc.perturbation_curves(model, images, maps, target=target, steps=4, device="cpu")
    # Quantus flips channel values (the map broadcast over the 3 channels): 3 of its 16-value steps = our 16 pixels
    metric = quantus.PixelFlipping(features_in_step=16, perturb_baseline=0.0, normalise=False, abs=False,
                                   disable_warnings=True)
    theirs = metric(model=model, x_batch=images.numpy(), y_batch=target.numpy(),
                    a_batch=maps[:, None].numpy(), channel_first=True, softmax=True, device="cpu")
    np.testing.assert_allclose(ours[:, 1:].numpy(), np.asarray(theirs)[:, 2::3], rtol=1e-5, atol=1e-6)


def test_randomising_the_model_changes_a_gradient_map():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    images = torch.randn(3, 3, 8, 8)

    def gradient(network, x):
        x = x.clone().requires_grad_(True)
        network(x)[:, 0].sum().backward()
        return x.grad.abs().sum(1)

    table = loc.randomisation_similarity(model, images, gradient, seed=1)
    assert table.layer.tolist() == ["3", "0"]
    assert (table.spearman_mean < 0.9).all()
    same = loc.randomisation_similarity(model, images, lambda network, x: images[:, 0].abs(), seed=1)
    assert np.allclose(same.spearman_mean, 1.0)  # a map that ignores the model fails the check


def test_randomisation_scores_a_map_turned_constant_as_uncorrelated_and_keeps_the_global_generator():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    images = torch.randn(3, 3, 8, 8)
    original = {"model": model}

    def flattens_once_randomised(network, x):
        return x[:, 0].abs() if network is original["model"] else torch.ones(len(x), 8, 8)

    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    table = loc.randomisation_similarity(model, images, flattens_once_randomised, seed=1)
    assert torch.rand(1) == expected_next  # the check's reinitialisation left the global generator alone
    assert table.spearman_mean.tolist() == [0.0, 0.0] and table.constant_maps.tolist() == [3, 3]
    assert table.images.tolist() == [3, 3]
    flat_original = loc.randomisation_similarity(model, images, lambda network, x: torch.ones(len(x), 8, 8), seed=1)
    assert flat_original.images.tolist() == [0, 0] and flat_original.spearman_mean.isna().all()
