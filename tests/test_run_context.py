"""The run context and the profile sections behind it: every section through the checked loader,
nested tables building the configs they feed, and the shipped profiles building the same configs as
before the sections were nested."""
from pathlib import Path

import pytest
import torch

import replication  # noqa: F401  (before torchvision)
from replication.analysis.dissection import DissectionConfig
from replication.methods.concept_groups import CGLSettings
from replication.methods.gated_paths import NADSettings, PathSearchConfig, official_beta
from replication.profiles import available_profiles, load_profile
from replication.reporting.claims import load_reference
from replication.reporting.notebook import RunContext, notebook_context
from replication.runtime import RuntimeSettings
from replication.training.classifiers import BaselineSettings
from replication.training.loop import TrainConfig

RUNTIME = '[runtime]\nthreads = 1\ndevice = "cpu"\nseeds = [4, 5]\nbatch_size = 16\n'
DISSECTION = '[dissection]\nsplit = "train"\nbatch_size = 8\nquantile = 0.01\niou_threshold = 0.05\n'


@pytest.fixture()
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _context(tmp_path: Path, monkeypatch, text: str, name: str = "03_concept_group_learning") -> RunContext:
    monkeypatch.setenv("REPLICATION_RESULTS", str(tmp_path / "results"))
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return notebook_context(name, str(path))


def test_run_context_holds_the_runtime_and_dissection_settings(tmp_path: Path, monkeypatch, restore_threads):
    ctx = _context(tmp_path, monkeypatch, RUNTIME + DISSECTION)
    assert ctx.device == torch.device("cpu") and ctx.batch_size == 16 and ctx.seeds == (4, 5)
    assert ctx.dissection == DissectionConfig(split="train", batch_size=8, quantile=0.01, iou_threshold=0.05)
    assert torch.get_num_threads() == 1
    assert ctx.out_dir == tmp_path / "results" / "03_concept_group_learning" and ctx.out_dir.is_dir()
    assert ctx.reference == load_reference("03_concept_group_learning")


def test_run_context_reference_of_a_notebook_without_one_is_a_clear_error(tmp_path: Path, monkeypatch, restore_threads):
    ctx = _context(tmp_path, monkeypatch, RUNTIME + DISSECTION, name="06_cross_paper")
    with pytest.raises(FileNotFoundError, match="no reference numbers for '06_cross_paper'"):
        ctx.reference


@pytest.mark.parametrize("text, message", [
    (RUNTIME + "num_workers = 8\n" + DISSECTION, r"\[runtime\] has keys \['num_workers'\] that RuntimeSettings does not accept"),
    (RUNTIME + DISSECTION + "quantlie = 0.01\n", r"\[dissection\] has keys \['quantlie'\] that DissectionConfig does not accept"),
    (RUNTIME.replace("threads = 1\n", ""), r"\[runtime\] lacks keys \['threads'\]"),
])
def test_run_context_refuses_unknown_and_missing_keys(tmp_path: Path, monkeypatch, text: str, message: str):
    with pytest.raises(KeyError, match=message) as error:
        _context(tmp_path, monkeypatch, text)
    assert str(tmp_path / "tiny.toml") in error.value.args[0]


def test_runtime_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RuntimeSettings(threads=1, batch_size=0)
    with pytest.raises(ValueError, match="seeds is empty"):
        RuntimeSettings(threads=1, batch_size=8, seeds=())


def test_baseline_settings_need_layers_for_every_arch():
    with pytest.raises(ValueError, match=r"no layers for \['alexnet'\]"):
        BaselineSettings(archs=("resnet18", "alexnet"), layers={"resnet18": ["layer4"]}, rotation_layers={"resnet18": "layer4"},
                         rotation_alphas=(0.0, 1.0))


def test_baseline_settings_rotate_only_a_dissected_layer():
    with pytest.raises(ValueError, match=r"rotation_layers.resnet18 = 'layer3': give one of the dissected layers"):
        BaselineSettings(archs=("resnet18",), layers={"resnet18": ["layer4"]}, rotation_layers={"resnet18": "layer3"},
                         rotation_alphas=(0.0, 1.0))


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_builds_its_runtime_dissection_and_baselines(name: str, paper_placeholders):
    profile = load_profile(name)
    runtime = profile.build(RuntimeSettings, "runtime")
    assert runtime.threads >= 1 and runtime.seeds
    assert profile.build(DissectionConfig, "dissection").quantile == 0.005
    if "baselines" in profile.sections:
        baselines = profile.build(BaselineSettings, "baselines")
        assert all(layer in baselines.layers[arch] for arch, layer in baselines.rotation_layers.items())


# The configs each profile built before [cgl] and [nad] had nested tables: CGL's TrainConfig (main
# experiment; the synthetic task's epochs and lr) and NAD's search epochs. Momentum 0.9, weight decay
# 1e-4 (off the block norm's layers) and the step schedule are CGLSettings' defaults.
CGL_TRAIN = {
    "ci": (TrainConfig(epochs=1, batch_size=64, lr=0.05, weight_decay=1e-4, schedule="step"), (2, 0.05)),
    "default": (TrainConfig(epochs=30, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine", augment="flip_crop"),
                (30, 0.05)),
    "gpu": (TrainConfig(epochs=30, batch_size=256, lr=0.05, weight_decay=1e-4, schedule="cosine"), (30, 0.05)),
    "paper": (TrainConfig(epochs=90, batch_size=256, lr=0.01, weight_decay=1e-4, schedule="step", step_size=30), (90, 0.01)),
}
# NAD's search: epochs (the cap when a stopping rule is set) and the flip-rate rule (None = fixed schedule)
NAD_SEARCH = {"ci": (2, 0.01), "default": (170, 0.01), "gpu": (170, 0.01), "paper": (20, None)}


@pytest.mark.parametrize("name", ["ci", "default", "gpu", "paper"])
def test_nested_sections_build_the_configs_the_profiles_built_before(name: str, paper_placeholders):
    profile = load_profile(name)
    cgl = profile.build(CGLSettings, "cgl")
    train, (synthetic_epochs, synthetic_lr) = CGL_TRAIN[name]
    assert cgl.train_config(seed=7) == TrainConfig(**{**vars(train), "seed": 7})  # every variant alike
    assert cgl.train_config(seed=1, epochs=cgl.synthetic_epochs, lr=cgl.synthetic_lr) == TrainConfig(
        **{**vars(train), "seed": 1, "epochs": synthetic_epochs, "lr": synthetic_lr})
    nad = profile.build(NADSettings, "nad")
    for arch in nad.archs:
        epochs, stop_flip_rate = NAD_SEARCH[name]
        assert nad.search_config(arch) == PathSearchConfig(beta=official_beta(arch), epochs=epochs,
                                                           stop_flip_rate=stop_flip_rate)


def test_a_misspelt_key_in_a_nested_table_names_it(tmp_path: Path):
    path = tmp_path / "typo.toml"
    path.write_text("[cgl.train]\nepochs = 2\nlearning_rate = 0.1\n[nad.search]\nepochs = 2\n")
    with pytest.raises(KeyError, match=rf"{path} \[cgl.train\] has keys \['learning_rate'\] that TrainConfig"):
        load_profile(path).build(CGLSettings, "cgl")
    assert load_profile(path).build(NADSettings, "nad").search == PathSearchConfig(epochs=2)
