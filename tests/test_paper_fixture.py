"""The `paper` profile on files in the real formats (tests/paper_fixture.py): its `$VAR` paths, the
error for an unset variable, the Broden and ImageFolder readers, the data sources a profile chooses
(real data or ConceptWorld), CGL's streamed real-data task and the Places365 / torchvision weights."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from replication import io
from replication.data.broden import BrodenDataset
from replication.data.classification import ClassificationDataset
from replication.data.sources import DataSources, data_sources, world_only
from replication.data.subsets import AttributeSubset, InMemoryDataset
from replication.methods.concept_groups import CGLSettings, main_task
from replication.methods.gated_paths import NADSettings, prepare_network
from replication.models.backbones import BackboneConfig, build_backbone, load_weights
from replication.profiles import ProfileError, _unset_variables, load_profile
from replication.training.loop import TrainConfig
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
    places = ClassificationDataset(paper_environment["PLACES365_DIR"], "val")
    assert len(places.classes) == PLACES365_CLASSES == len(places)  # as many classes as the Places365 file's outputs


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


def test_a_profile_with_a_broden_section_reads_real_data(paper_environment):
    profile = load_profile("paper")
    sources = data_sources(profile, profile.build(CGLSettings, "cgl").data_root, section="cgl")
    assert sources.real and sources.kind == "real data"
    assert (str(sources.classification), str(sources.broden)) == (paper_environment["IMAGENET_DIR"], paper_environment["BRODEN_DIR"])


def test_a_profile_without_one_reads_its_concept_world(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_DATA", str(tmp_path / "data"))
    path = tmp_path / "world.toml"
    path.write_text('[world]\npreset = "classification"\nn_images = 12\nimage_size = 32\nseed = 3\n')
    sources = data_sources(load_profile(path), None, section="nad")
    assert not sources.real and sources.kind == "ConceptWorld"
    assert sources.classification == sources.broden and (sources.broden / "index.csv").is_file()



def test_world_only_steps_run_on_concept_world_and_say_why_they_are_skipped_on_real_data(capsys):
    world, real = DataSources(Path("w"), Path("w"), real=False), DataSources(Path("c"), Path("b"), real=True)
    assert world_only(world, "class rules") and capsys.readouterr().out == ""
    assert not world_only(real, "class rules (classes.json)")
    assert capsys.readouterr().out == "class rules (classes.json): ConceptWorld only; skipped on real data.\n"

def test_real_data_needs_both_a_data_root_and_a_broden_section(tmp_path):
    broden_only, root_only = tmp_path / "broden_only.toml", tmp_path / "root_only.toml"
    broden_only.write_text('[broden]\nroot = "/data/broden1_224"\n')
    root_only.write_text('[world]\nn_images = 12\n')
    with pytest.raises(ValueError) as error:
        data_sources(load_profile(broden_only), None, section="cgl")
    assert str(error.value) == (f"{broden_only} has a [broden] section (real data) but [cgl] sets no data_root; set "
                                f"data_root there to a folder of train/<class>/ and val/<class>/ image folders.")
    with pytest.raises(ValueError) as error:
        data_sources(load_profile(root_only), "/data/imagenet", section="nad")
    assert str(error.value) == (f"{root_only} [nad] sets data_root but the profile has no [broden] section for its concept "
                                f"labels; add [broden] root = <unpacked broden1_224> or remove data_root to use ConceptWorld.")


def test_cgl_streams_real_data_from_disk_keyed_by_the_images_it_keeps(paper_environment):
    profile = load_profile("paper")
    settings = CGLSettings(data_root=paper_environment["IMAGENET_DIR"], image_size=48, train_images=6, dissection_images=4)
    task = main_task(data_sources(profile, settings.data_root, section="cgl"), settings, split="val")
    assert isinstance(task.train, AttributeSubset) and len(task.train) == 6 and task.train[0][0].shape == (3, 48, 48)
    full = ClassificationDataset(paper_environment["IMAGENET_DIR"], "train", image_size=48)
    assert task.train.fingerprint == InMemoryDataset(full, task.train.indices).fingerprint
    assert len(task.val) == len(CLASSES) * IMAGES_PER_CLASS["val"] and len(task.broden) == 4
    assert task.classes == list(CLASSES)


def test_nad_refuses_to_train_a_network_on_class_folders(paper_environment):
    root = paper_environment["IMAGENET_DIR"]
    with pytest.raises(ValueError) as error:
        prepare_network(NADSettings(archs=("resnet18",)), "resnet18", root, model_config=BackboneConfig(),
                        train_config=TrainConfig(epochs=1, batch_size=4, lr=0.1), seed=0)
    assert str(error.value) == ("[nad] arch resnet18 has no weights and only ConceptWorld networks are trained here; set "
                                f"model_overrides.resnet18.weights to a pretrained file for the class folders at {root}.")
