"""NAD on the NAS connection family (timm EfficientNet, the pretrained EfficientNet-Lite0): gate placement
in forward order, exact all-open gates, one path-search step, the DARTS beta, and unknown families."""
import dataclasses

import pytest
import torch

import replication  # noqa: F401  (before torchvision and timm)
import timm

from replication.methods import gated_paths as gp
from replication.methods.gated_paths import gates as nad_gates
from replication.methods.gated_paths import search as nad_search
from replication.models.anatomy import anatomy_of
from replication.models.hooks import get_module
from replication.models.backbones import BackboneConfig
from replication.models.pretrained import TORCHVISION_MEAN, TORCHVISION_STD, pretrained, spec_of
from replication.training.loop import TrainConfig
from tests.helpers import assert_close
from tests.paper_fixture import write_image_folders

# EfficientNet-Lite0's gates at a 224-px input, (channels, spatial size): stem bn1, the 16 MBConv blocks
# (stages of 1, 2, 2, 3, 3, 4, 1 blocks), head bn2.
LITE0_GATES = ([(32, 112), (16, 112)] + [(24, 56)] * 2 + [(40, 28)] * 2 + [(80, 14)] * 3 + [(112, 14)] * 3
               + [(192, 7)] * 4 + [(320, 7), (1280, 7)])
SIZE = 64  # TF "SAME" padding: every spatial size scales exactly by 64/224


@pytest.fixture(scope="module")
def lite0():
    return pretrained("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def fired_in_order(model, names, x):
    """The names among `names` in the order their modules run during one forward of `x`."""
    order = []
    handles = [get_module(model, name).register_forward_hook(lambda *_, name=name: order.append(name))
               for name in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return order


def test_lite0_gates_are_stem_every_block_and_head_in_forward_order(lite0, images):
    locations = gp.gate_locations(lite0, (3, SIZE, SIZE))
    names = [loc.name for loc in locations]
    assert names == ["bn1", *anatomy_of(lite0).blocks, "bn2"] and len(names) == 18
    assert fired_in_order(lite0, names, images[:1]) == names
    assert [(loc.channels, loc.height) for loc in locations] == [(c, s * SIZE // 224) for c, s in LITE0_GATES]
    assert all(loc.height == loc.width and not loc.relu_after for loc in locations)
    network = gp.Network(lite0, "efficientnet_lite0", 0, {}, None, locations)
    row = gp.placement_table({"efficientnet_lite0": network}).iloc[0]
    assert (row["family"], row["gates"], row["units"]) == ("nas", 18, 3120)


def test_gates_of_another_timm_efficientnet_are_its_modules_in_forward_order():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=3).eval()
    names = [loc.name for loc in gp.gate_locations(model, (3, 32, 32))]
    assert set(names) <= dict(model.named_modules()).keys() and len(names) == 18
    assert fired_in_order(model, names, torch.zeros(1, 3, 32, 32)) == names


def test_open_gates_reproduce_lite0_exactly_and_gate_the_activated_stem(lite0, images):
    locations = gp.gate_locations(lite0, (3, SIZE, SIZE))
    with torch.no_grad():
        expected = lite0(images)
        with gp.gated(lite0, locations) as hooks:
            hooks.set(gp.ones_gates(locations))
            assert torch.equal(lite0(images), expected)
            stem, block = hooks.outputs["bn1"], hooks.outputs["blocks.0.0"]
            assert 0 <= stem.min() and stem.max() <= 6  # bn1 applies ReLU6 inside: the gate sees its output
            assert block.min() < 0  # an MBConv block's output is linear
            hooks.set(None)
            assert torch.equal(lite0(images), expected)
            closed = gp.ones_gates(locations)
            closed[-1] = torch.zeros_like(closed[-1])  # the head: nothing reaches the classifier but its bias
            hooks.set(closed)
            assert torch.equal(lite0(images), lite0.classifier.bias.expand(2, -1))
    assert sum(len(m._forward_hooks) for m in lite0.modules()) == 0


def test_one_search_step_on_lite0_moves_every_gate_by_lr_and_batched_equals_sequential(lite0, images):
    locations = gp.gate_locations(lite0, (3, SIZE, SIZE))
    with torch.no_grad():
        class_id = int(lite0(images[:1]).argmax())  # image 0 is "correct": the MSE term takes part
    class_images = {class_id: images}
    config = gp.PathSearchConfig(beta=gp.official_beta("efficientnet_lite0"), epochs=1, batch_size=2)
    init = nad_search._class_plans([class_id], [2], locations, config)[0].init
    sequential = gp.find_paths_sequential(lite0, locations, class_images, config=config, device="cpu")
    batched = gp.search_paths(lite0, locations, class_images, config=config, device="cpu")
    for before, seq, bat in zip(init, sequential.logits, batched.logits):
        assert_close((seq[0] - before).norm(), config.lr, atol=1e-6)
        assert_close(bat, seq, atol=1e-5)
    assert not lite0.training


def test_nas_beta_is_the_official_darts_value():
    assert gp.official_beta("efficientnet_lite0") == gp.OFFICIAL_BETA["imagenet"]["darts"] == 0.45
    assert gp.official_beta("efficientnet_lite0", "places365") == 0.20


def test_a_family_without_placement_is_a_one_line_error(lite0, monkeypatch):
    capsule = dataclasses.replace(anatomy_of(lite0), family="capsule")
    monkeypatch.setattr(nad_gates, "anatomy_of", lambda model: capsule)
    with pytest.raises(ValueError, match=r"^no NAD gate placement for connection family 'capsule'; "
                                         r"known: dense, nas, plain, residual \(add a rule") as error:
        gp.gate_locations(lite0, (3, SIZE, SIZE))
    assert "\n" not in str(error.value)


def test_on_imagenet_class_folders_lite0_is_analysed_as_its_own_imagenet_classifier(tmp_path):
    def prepare(root):
        return gp.prepare_network(gp.NADSettings(archs=("efficientnet_lite0",)), "efficientnet_lite0", root,
                                  model_config=BackboneConfig(arch="efficientnet_lite0"),
                                  train_config=TrainConfig(epochs=1, batch_size=4, lr=0.01),
                                  seed=0, device="cpu")

    write_image_folders(tmp_path / "five", counts={"train": 1})
    with pytest.raises(ValueError, match="has 5 class folders, not ImageNet's 1000"):
        prepare(tmp_path / "five")
    write_image_folders(tmp_path / "imagenet", {f"n{index:08d}": (0, 0, 0) for index in range(1000)}, {"train": 1})
    model, key, history = prepare(tmp_path / "imagenet")
    assert history is None and "train" not in key and not model.training
    images = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1), torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1)
    spec = spec_of("efficientnet_lite0")
    own = (images - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert_close(model((images - mean) / std), pretrained("efficientnet_lite0", device="cpu")(own), atol=1e-4)
