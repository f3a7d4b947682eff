"""Notebook 02's pieces on tiny inputs: the evidence data, the LAP recipe, and the claims rules on constructed tables."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from replication.methods import attention_pooling as lp
from replication.models.backbones import BackboneConfig
from replication.reporting.claims import load_reference


def test_evidence_set_carries_each_images_mask_at_the_image_size(tiny_world):
    data = lp.EvidenceSet(tiny_world, "train")
    image, label, extras = data[0]
    assert image.shape == (3, 32, 32) and extras["masks"].shape == (1, 32, 32)
    stem = pd.read_csv(tiny_world / "tasks.csv").query("split == 'train'").image.iloc[0].rsplit(".", 1)[0]
    mask = np.asarray(Image.open(tiny_world / "evidence" / f"{stem}.png")) > 127
    assert torch.equal(extras["masks"][0, ::2, ::2] > 0.5, torch.from_numpy(mask))  # 16 px mask, nearest upsampling
    subset = lp.explained_subset(data, 3, seed=0)
    assert len(subset) == 3 and subset.fingerprint != data.fingerprint
    assert data.indices == list(range(len(data)))
    for position, index in enumerate(subset.indices):  # split indices, kept through a subset of the subset
        assert torch.equal(subset.images[position], data.images[index])
    assert subset.subset([2, 0]).indices == [subset.indices[2], subset.indices[0]]


def test_lap_recipe_starts_from_the_trained_weights_and_keys_them():
    config = BackboneConfig(arch="resnet18", small_input=True, width=0.125)
    torch.manual_seed(0)
    start = config.build(4).eval()
    recipe = lp.LAPRecipe(config, 4, lp.LAPConfig(), {"weak": 1.0, "mask": 1.0, "sparsity": 0.0}, image_size=32, start=start)
    model = recipe.build().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), start(images), rtol=1e-5, atol=1e-5)
    assert [t.name for t in recipe.loss_terms(model)] == ["lap_weak", "lap_mask"]
    assert recipe.key(model)["start"] == lp.state_fingerprint(start)
    with torch.no_grad():
        start.fc.bias.add_(1.0)
    assert recipe.key(model)["start"] != lp.state_fingerprint(model)


def _tables(gain: float, seeds=(0, 1, 2), original=95.0):
    rng = np.random.default_rng(0)
    accuracy = pd.DataFrame([{"network": "net", "seed": s, "model": m, "val_acc": original + (gain if m != "original" else 0)
                              + (0.1 * rng.standard_normal() if m != "original" else 0)}
                             for s in seeds for m in ("original", "LAP fine-tuned (weak)", "LAP scratch (weak)")])
    rows = []
    for method, shift in (("LAP", gain), ("gradcam", 0.0), ("random", -0.2)):
        for image in range(36):
            rows.append({"network": "net", "model": "LAP", "method": method, "image": image, "class_id": image % 6,
                         "pointing": 0.5 + shift / 2 + 0.01 * rng.standard_normal(), "energy": 0.3 + shift / 4 + 0.01 * rng.standard_normal(),
                         "auroc": 0.7 + shift / 4 + 0.01 * rng.standard_normal(), "deletion": 0.3 - shift / 4 + 0.01 * rng.standard_normal(),
                         "insertion": 0.6 + shift / 4 + 0.01 * rng.standard_normal()})
    injection = pd.DataFrame([{"network": "net", "seed": s, "variant": v, "val_acc": original + 0.05 * rng.standard_normal(),
                               "energy": e + 0.01 * rng.standard_normal()}
                              for s in seeds for v, e in (("plain", 0.2), ("weak", 0.3), ("weak+mask", 0.5))])
    sanity = pd.DataFrame([{"network": "net", "method": "LAP", "stage": 1, "spearman_mean": 0.1}])
    return accuracy, pd.DataFrame(rows), injection, sanity


def _verdicts(tables, **kwargs):
    results = lp.claim_results(*tables, load_reference("02_local_attention_pooling"), main="weak", profile="default", **kwargs)
    return {r.claim_id: r.verdict for r in results}


def test_claims_confirm_a_clear_gain_and_refute_a_clear_loss():
    verdicts = _verdicts(_tables(gain=2.0))
    assert verdicts == {"L1": "confirmed", "L2": "confirmed", "L3": "confirmed", "L4": "confirmed", "L5": "confirmed",
                        "L6": "not testable here", "L7": "confirmed", "L8": "confirmed"}
    worse = _verdicts(_tables(gain=-3.0))
    assert worse["L2"] == worse["L3"] == worse["L7"] == worse["L8"] == "refuted"


def test_claims_are_not_judged_on_a_network_that_did_not_learn_and_a_failed_sanity_check_refutes_l8():
    assert set(_verdicts(_tables(gain=2.0, original=40.0)).values()) == {"not testable here"}
    accuracy, metrics, injection, sanity = _tables(gain=2.0)
    verdicts = _verdicts((accuracy, metrics, injection, sanity.assign(spearman_mean=0.9)))
    assert verdicts["L8"] == "refuted" and verdicts["L7"] == "confirmed"


def test_holm_family_is_per_claim_by_default_and_said_in_every_note():
    tables = _tables(gain=2.0)
    reference = load_reference("02_local_attention_pooling")
    per_claim = {r.claim_id: r for r in lp.claim_results(*tables, reference, main="weak", profile="default")}
    together = {r.claim_id: r for r in lp.claim_results(*tables, reference, main="weak", profile="default",
                                                        holm_family="notebook")}
    assert "Holm over this claim's 2 tests" in per_claim["L4"].note  # energy and accuracy on one network
    assert "Holm over the notebook's" in together["L4"].note
    assert per_claim["L4"].ours != together["L4"].ours  # the same effects, adjusted in a smaller family
    with pytest.raises(ValueError, match="holm_family"):
        lp.claim_results(*tables, reference, main="weak", profile="default", holm_family="seeds")


def test_l8_is_inconclusive_when_no_original_lap_map_has_a_ranking():
    accuracy, metrics, injection, sanity = _tables(gain=2.0)
    results = lp.claim_results(accuracy, metrics, injection, sanity.assign(spearman_mean=float("nan")),
                               load_reference("02_local_attention_pooling"), main="weak", profile="default")
    l8 = next(r for r in results if r.claim_id == "L8")
    assert l8.verdict == "inconclusive" and "every original map constant" in l8.ours


def test_settings_refuse_networks_outside_networks():
    with pytest.raises(ValueError, match="scratch_networks"):
        lp.LAPSettings(networks=("resnet18",), scratch_networks=("alexnet_bn",), injection_networks=(),
                       explained_networks=())


@pytest.mark.parametrize("change,named", [
    (dict(lrp_composite="epsilon"), "lrp_composite 'epsilon'"),
    (dict(lap=lp.LAPConfig(combine="max")), "lap.combine 'max'"),
    (dict(lap=lp.LAPConfig(weight_mode="max")), "lap.weight_mode 'max'"),
    (dict(lap=lp.LAPConfig(head_mode="sum")), "lap.head_mode 'sum'"),
    (dict(ig_steps=0), "ig_steps"),
    (dict(perturbation_steps=0), "perturbation_steps"),
    (dict(lap=lp.LAPConfig(init_std=-1.0)), "lap.init_std"),
    (dict(lap_map="attention"), "lap_map 'attention'"),
    (dict(holm_family="paper"), "holm_family 'paper'"),
])
def test_settings_refuse_unknown_names_and_steps_before_any_training(change, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")) as error:
        lp.LAPSettings(**change)
    assert str(error.value).startswith("[lap] ")


class _Images(torch.utils.data.Dataset):
    """The three fields `map_metrics` reads, on hand-made images and masks."""

    def __init__(self, images, targets, masks):
        self.images, self.targets, self.masks, self.indices = images, targets, masks, [7, 3, 5]

    def __len__(self):
        return len(self.targets)


def test_the_random_control_scores_its_expectation_and_the_mean_of_seeded_draws():
    from replication.analysis import localisation as loc
    from replication.methods.attention_pooling.experiment import random_draws
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    images = torch.randn(3, 3, 4, 4)
    masks = torch.zeros(3, 1, 4, 4)
    masks[:, :, :2, :1] = 1.0  # 2 of 16 pixels
    data, settings = _Images(images, torch.tensor([0, 1, 0]), masks), lp.LAPSettings(control_draws=3, perturbation_steps=4)
    control = torch.rand(3, 4, 4)
    table, curves = lp.map_metrics(model, data, {lp.CONTROL: control}, settings, batch_size=8, device="cpu")
    assert table.pointing.tolist() == table.energy.tolist() == [2 / 16] * 3 and table.auroc.tolist() == [0.5] * 3
    assert table.val_index.tolist() == [7, 3, 5] and table.image.tolist() == [0, 1, 2]
    predicted = model(images).argmax(1)
    draws = random_draws(control, 3, settings.subset_seed + 1)
    assert torch.equal(draws[0], control) and not torch.equal(draws[1], draws[2])
    by_draw = [loc.curve_auc(loc.perturbation_curves(model, images, d, target=predicted, steps=4, device="cpu")) for d in draws]
    np.testing.assert_allclose(table.deletion, torch.stack(by_draw).mean(0).numpy(), rtol=1e-6)


def test_injection_validity_scores_the_pooling_map_and_lists_the_class_heads_energy():
    from replication.methods.attention_pooling.layer import LAP2d
    model = torch.nn.Sequential(torch.nn.Identity(), LAP2d(3, heads=2, head_mode="mean", flatten=True, init_std=0.0),
                                torch.nn.Linear(3, 2)).eval()
    model[1].attention = _FixedScores()  # head 0 scores the top-left pixel high, head 1 is flat
    with torch.no_grad():  # every image predicted as class 0, whose head is read as the class head
        model[2].weight.zero_()
        model[2].bias.copy_(torch.tensor([1.0, 0.0]))
    masks = torch.zeros(3, 1, 4, 4)
    masks[:, :, 0, 0] = 1.0  # the top-left pixel is the evidence
    data = _Images(torch.randn(3, 3, 4, 4), torch.tensor([0, 0, 0]), masks)
    settings = lp.LAPSettings(control_draws=1)
    got = lp.injection_validity(model, data, settings, "weak", batch_size=2, device="cpu")
    a = torch.sigmoid(torch.tensor([10.0] + [0.0] * 15))  # head 0's attention; gauss_max weighs by (max A - A_p)^2
    head = torch.softmax(-model[1].alpha.detach() * (a.max() - a) ** 2, 0)
    pooled = (head + 1 / 16) / 2  # the pooling map: the mean of the two heads' weights
    assert got["pointing"] == 1.0 and got["constant_maps"] == 0
    assert got["energy"] == pytest.approx(float(pooled[0] / pooled.sum()), rel=1e-3)
    assert got["class_head_energy"] > got["energy"]  # the class head's own map is not diluted by the flat head
    assert "class_head_energy" not in lp.injection_validity(model, data, lp.LAPSettings(control_draws=1, lap_map="class_head"),
                                                            "weak", batch_size=2, device="cpu")


class _FixedScores(torch.nn.Module):
    def forward(self, x):
        scores = torch.zeros(len(x), 2, 4, 4)
        scores[:, 0, 0, 0] = 10.0
        return scores
