"""The `paper` profile on files in the real formats (tests/paper_fixture.py): its `$VAR` paths, the
error for an unset variable, the Broden and ImageFolder readers and the Places365 / torchvision weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replication import io
from replication.data.broden import BrodenDataset
from replication.data.classification import ClassificationDataset
from replication.methods.gated_paths import NADSettings
from replication.models.backbones import BackboneConfig, build_backbone, load_weights
from replication.profiles import ProfileError, _unset_variables, load_profile
from tests.paper_fixture import CLASSES, IMAGES_PER_CLASS, PAPER_VARIABLES, PLACES365_CLASSES, write_paper_fixture

WRITTEN = ("resnet18", "densenet121")  # the smallest full-size files that cover both formats (70 MiB)


@pytest.fixture(scope="module")
def fixture_environment(tmp_path_factory) -> dict[str, str]:
    return write_paper_fixture(tmp_path_factory.mktemp("paper"), archs=WRITTEN)


@pytest.fixture()
def paper_environment(fixture_environment, monkeypatch) -> dict[str, str]:
    """The fixture's variables set, every other variable paper.toml reads unset."""
    for variable in PAPER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in fixture_environment.items():
        monkeypatch.setenv(variable, value)
    return fixture_environment


def test_the_fixture_knows_every_variable_paper_toml_reads(monkeypatch):
    for variable in PAPER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    read = {variable for variable, _ in _unset_variables(dict(load_profile("paper").sections), "")}
    assert read == set(PAPER_VARIABLES)


def test_the_paper_profile_reads_the_fixture_paths(paper_environment):
    profile = load_profile("paper")
    assert profile.section("broden")["root"] == paper_environment["BRODEN_DIR"]
    assert profile.build(BackboneConfig, "model").weights == paper_environment["RESNET18_PLACES365_WEIGHTS"]


def test_an_unset_variable_is_named_when_its_section_is_read(paper_environment, monkeypatch):
    profile = load_profile("paper")  # loads without them: only [nad] reads the missing ones
    with pytest.raises(ProfileError) as error:
        profile.build(NADSettings, "nad")
    message = str(error.value)
    assert message == (f"{profile.file} [nad] reads environment variables that are not set: VGG16_WEIGHTS "
                       f"(model_overrides.vgg16.weights), RESNET50_WEIGHTS (model_overrides.resnet50.weights); set them "
                       f"to local paths (the file's comments say what each holds) and run again.")
    monkeypatch.setenv("VGG16_WEIGHTS", "/elsewhere/vgg16.pth")
    monkeypatch.setenv("RESNET50_WEIGHTS", "/elsewhere/resnet50.pth")
    nad = load_profile("paper").build(NADSettings, "nad")
    assert nad.data_root == paper_environment["IMAGENET_DIR"]
    assert nad.model_overrides["densenet121"]["weights"] == paper_environment["DENSENET121_WEIGHTS"]


def test_the_broden_reader_reads_the_fixture(paper_environment):
    dataset = BrodenDataset(paper_environment["BRODEN_DIR"], split="val")
    item = dataset[0]
    assert len(dataset) > 0 and dataset.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert item["image"].shape == (3, 64, 64) and item["pixel_labels"].shape[1:] == (32, 32)
    assert "disk" in dataset.label_names


def test_the_classification_reader_reads_the_image_folders(paper_environment):
    for split, count in IMAGES_PER_CLASS.items():
        dataset = ClassificationDataset(paper_environment["IMAGENET_DIR"], split)
        assert dataset.layout == "imagefolder" and dataset.classes == list(CLASSES)
        assert sorted(dataset.targets) == sorted(list(range(len(CLASSES))) * count)


def test_the_places365_file_loads_into_resnet18_through_the_profile(paper_environment):
    model = load_profile("paper").build(BackboneConfig, "model").build(PLACES365_CLASSES)
    saved = io.load_torch(paper_environment["RESNET18_PLACES365_WEIGHTS"])
    assert set(saved) == {"epoch", "arch", "state_dict"} and all(k.startswith("module.") for k in saved["state_dict"])
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, saved["state_dict"][f"module.{key}"]), key


def test_the_torchvision_densenet_file_with_legacy_names_loads(paper_environment):
    saved = io.load_torch(paper_environment["DENSENET121_WEIGHTS"])
    assert "features.denseblock1.denselayer1.norm.1.weight" in saved
    model = load_weights(build_backbone("densenet121", len(CLASSES)), Path(paper_environment["DENSENET121_WEIGHTS"]))
    assert torch.equal(model.features.denseblock1.denselayer1.norm1.weight, saved["features.denseblock1.denselayer1.norm.1.weight"])
