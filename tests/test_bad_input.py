"""Bad inputs get one clear line naming what is wrong and what to do (reliability review, section 2).

Case numbers refer to the review's tables in `reviews/reliability.md`.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import pickle
import shutil
import tomllib
from pathlib import Path
from typing import Literal, Optional

import pytest
import torch

from replication import io
from replication.analysis.dissection import DissectionConfig, dissect
from replication.cli import main
from replication.data import concept_world as cw
from replication.data.broden import BrodenDataset
from replication.data.classification import ClassificationDataset, ImageFileError
from replication.data.sources import BrodenSource
from replication.methods.attention_pooling import LAPSettings
from replication.methods.concept_groups import CGLSettings
from replication.methods.gated_paths import NADSettings
from replication.methods.concept_whitening import CWSettings
from replication.methods.interpretable_basis import UIBESettings
from replication.models.backbones import BackboneConfig, build_backbone, load_weights
from replication.models.hooks import capture_activations, get_module
from replication.profiles import ProfileError, available_profiles, load_profile
from replication.runtime import RuntimeSettings
from replication.training.classifiers import BaselineSettings
from replication.training.loop import TrainConfig

TINY_WORLD = '[world]\npreset = "classification"\nn_images = 12\nimage_size = 32\nseed = 3\n'
# every profile section that is built into a dataclass, and the dataclass
BUILT_SECTIONS = {"world": cw.WorldConfig, "cgl_world": cw.WorldConfig, "model": BackboneConfig,
                  "train": TrainConfig, "cgl": CGLSettings, "nad": NADSettings, "runtime": RuntimeSettings,
                  "dissection": DissectionConfig, "baselines": BaselineSettings, "broden": BrodenSource,
                  "uibe": UIBESettings, "cw": CWSettings, "lap": LAPSettings}


@pytest.fixture()
def world_copy(tiny_world: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_world, tmp_path / "world"))


def _one_line(error: BaseException | str) -> str:
    text = str(error.value if isinstance(error, pytest.ExceptionInfo) else error)
    assert "\n" not in text and "\x1b" not in text and "Traceback" not in text, text
    return text


def _cli_error(argv: list[str]) -> str:
    """The message `main` exits with (it must be one line, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return _one_line(exit_info.value.code)


# ---------------------------------------------------------------- datasets (cases 10, 13, 57)
def _first_sample(root: Path, split: str) -> tuple[int, str]:
    """(tasks.csv line, image name) of the first row of `split`."""
    lines = (root / "tasks.csv").read_text().splitlines()
    number = next(n for n, line in enumerate(lines, start=1) if n > 1 and line.split(",")[1] == split)
    return number, lines[number - 1].split(",")[0]


def test_classification_image_replaced_by_text_names_file_line_and_fix(world_copy: Path):  # case 13
    line, name = _first_sample(world_copy, "train")
    (world_copy / "images" / name).write_text("not an image\n")
    with pytest.raises(ImageFileError) as error:
        ClassificationDataset(world_copy, "train")[0]
    message = _one_line(error)
    assert f"{name} (tasks.csv line {line}) cannot be read" in message
    assert "replace the file" in message and "--overwrite" in message


def test_classification_missing_image_names_file_and_line(world_copy: Path):
    line, name = _first_sample(world_copy, "val")
    (world_copy / "images" / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name} \(tasks\.csv line {line}\) is missing; replace the file"):
        ClassificationDataset(world_copy, "val")[0]


def test_imagefolder_image_replaced_by_text_names_the_file(tmp_path: Path):  # case 13, ImageFolder layout
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_text("not an image\n")
    with pytest.raises(ImageFileError) as error:
        ClassificationDataset(tmp_path, "train")[0]
    assert _one_line(error) == f"image {tmp_path / 'train' / 'cat' / 'a.png'} cannot be read (not a readable image); replace or delete the file."


def test_cached_world_missing_files_say_delete_the_folder(world_copy: Path, tmp_path: Path, monkeypatch):  # case 57
    monkeypatch.setenv("REPLICATION_DATA", str(tmp_path / "data"))
    cached = tmp_path / "data" / "concept_world" / "0123abcd"
    shutil.move(world_copy, cached)
    _, name = _first_sample(cached, "val")
    (cached / "images" / name.replace(".png", "_object.png")).unlink()
    with pytest.raises(FileNotFoundError) as error:
        BrodenDataset(cached, split="val").validate()
    message = _one_line(error)
    assert f"delete {cached} (a cached ConceptWorld); the next run regenerates it" in message
    assert "--profile" not in message
    (cached / "index.csv").unlink()
    with pytest.raises(FileNotFoundError, match=f"index.csv is missing; .*delete {cached} "):
        BrodenDataset(cached)
    (cached / "images" / name).write_bytes(b"")
    with pytest.raises(ImageFileError, match=f"delete {cached} "):
        ClassificationDataset(cached, "val")[0]


def test_other_world_with_missing_files_names_no_made_up_profile(world_copy: Path):  # case 57
    (world_copy / "index.csv").unlink()
    with pytest.raises(FileNotFoundError) as error:
        BrodenDataset(world_copy)
    message = _one_line(error)
    assert f"--profile <that profile> --out {world_copy} --overwrite" in message
    assert "--profile default" not in message


def test_unknown_split_is_one_line(tiny_world: Path):  # case 10
    with pytest.raises(ValueError, match=r"unknown split 'test'; use None"):
        BrodenDataset(tiny_world, split="test")


# ---------------------------------------------------------------- layers (cases 14-17)
@pytest.mark.parametrize("arch, name, nearest", [
    ("resnet18", "layer5", "layer4"),
    ("densenet121", "features.denseblock5", "features.denseblock4"),
    ("alexnet", "features.99", "features.9"),
])
def test_unknown_layer_lists_nearest_and_top_level_names_only(arch: str, name: str, nearest: str):  # case 14
    model = build_backbone(arch, num_classes=10, small_input=True, width=0.125)
    with pytest.raises(ValueError) as error:
        get_module(model, name)
    message = _one_line(error)
    top_level = ", ".join(child for child, _ in model.named_children())
    assert message.startswith(f"unknown layer {name!r}") and f"nearest: {nearest}" in message
    assert f"top-level: {top_level}" in message and len(message) < 600
    with pytest.raises(ValueError, match=f"unknown layer {name!r}.*top-level"):
        dissect(model, name, None)
    with pytest.raises(ValueError, match=f"unknown layer {name!r}.*top-level"):
        with capture_activations(model, ["features" if arch != "resnet18" else "layer1", name]):
            pass


def test_unknown_layer_of_a_small_model_lists_every_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    with pytest.raises(ValueError, match=r"^unknown layer 'x'; valid layers: 0, 1$"):
        get_module(model, "x")


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be at least 1; got 0"),
    ({"batch_size": -4}, "batch_size must be at least 1; got -4"),
    ({"quantile": 0.0}, "quantile must lie in"),
])
def test_dissect_rejects_bad_settings(tiny_world: Path, options: dict, message: str):  # cases 15-17
    model = build_backbone("resnet18", num_classes=10, small_input=True, width=0.125)
    with pytest.raises(ValueError, match=message):
        dissect(model, "layer1", BrodenDataset(tiny_world), device="cpu", **options)


# ---------------------------------------------------------------- checkpoints (cases 19-27, 58)
def _small_state(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = build_backbone("resnet18", num_classes=10, small_input=True, width=0.125)
    path = tmp_path / "good.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_text_file_as_weights_is_not_a_checkpoint(tmp_path: Path):  # case 19
    model, _ = _small_state(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError) as error:
        load_weights(model, tmp_path / "notes.txt")
    message = _one_line(error)
    assert message == (f"{tmp_path / 'notes.txt'} is not a readable torch checkpoint (truncated, corrupted, or not written "
                       "by torch.save); point to a file written by torch.save (e.g. of model.state_dict()), or re-create this one.")


def test_missing_and_directory_weights_paths_are_told_apart(tmp_path: Path):  # cases 20, 21
    model, _ = _small_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist; point to a local checkpoint"):
        load_weights(model, tmp_path / "absent.pth")
    with pytest.raises(IsADirectoryError, match="is a directory; point to the checkpoint file itself"):
        load_weights(model, tmp_path)


@pytest.mark.parametrize("cut", [5000, -100, 0])
def test_truncated_checkpoint_names_the_file(tmp_path: Path, cut: int):  # case 27
    model, good = _small_state(tmp_path)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:cut] if cut else b"")
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable torch checkpoint .*re-create this one"):
        io.load_torch(tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_weights(model, tmp_path / "cut.pt")


def test_truncated_cached_checkpoint_says_delete_its_stage_folder(tmp_path: Path, monkeypatch):  # case 58
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path / "cache"))
    _, good = _small_state(tmp_path)
    stage = tmp_path / "cache" / "classifier" / "0123abcd"
    stage.mkdir(parents=True)
    (stage / "model.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError) as error:
        io.load_torch(stage / "model.pt")
    assert _one_line(error).endswith(f"delete the stage folder {stage}; the next run rebuilds it.")


class _RunsCode:
    """Pickles as a call to os.system that would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickles_that_run_code_are_refused_and_never_run(tmp_path: Path, writer: str):  # cases 25, 26
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save({"weight": _RunsCode(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(ValueError) as error:
        io.load_torch(path)
    _one_line(error)
    assert not marker.exists()


def test_whole_model_pickle_is_refused_in_one_line(tmp_path: Path):  # case 24
    model, _ = _small_state(tmp_path)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ValueError) as error:
        load_weights(model, tmp_path / "whole.pt")
    message = _one_line(error)
    assert "not a plain state dict" in message and "pickles torch" in message and "torch.save(model.state_dict()" in message


# ---------------------------------------------------------------- profiles (cases 38-40, 43-45, 52)
def test_malformed_toml_names_the_file_and_position(tmp_path: Path):  # case 39
    bad = tmp_path / "bad.toml"
    bad.write_text('[world]\nn_images = [1, 2\nseed = 0\n')
    with pytest.raises(ProfileError, match=rf"profile file {bad} is not valid TOML: .*line \d+, column \d+"):
        load_profile(bad)
    assert str(bad) in _cli_error(["world", "--profile", str(bad), "--out", str(tmp_path / "w")])


def test_missing_toml_file_is_not_an_unknown_profile(tmp_path: Path):  # cases 38, 40
    missing = tmp_path / "missing.toml"
    with pytest.raises(FileNotFoundError, match=f"profile file {missing} not found"):
        load_profile(missing)
    assert _cli_error(["reproduce", "--profile", "nope"]).startswith("error: unknown profile 'nope'")


@pytest.mark.parametrize("section, line, expects", [
    ("world", 'n_images = "ten"', "WorldConfig.n_images expects int"),
    ("world", "n_images = 10.5", "WorldConfig.n_images expects int"),
    ("world", "seed = true", "WorldConfig.seed expects int"),
    ("world", 'val_fraction = "high"', "WorldConfig.val_fraction expects float"),
    ("world", "object_area = [0.1]", "WorldConfig.object_area expects tuple[float, float]"),
    ("world", 'distractors = [1, "2"]', "WorldConfig.distractors expects tuple[int, int]"),
    ("world", "mask_size = 16.0", "WorldConfig.mask_size expects int | None"),
    ("model", "small_input = 1", "BackboneConfig.small_input expects bool"),
    ("train", "epochs = 1.5", "TrainConfig.epochs expects int"),
    ("cgl", 'archs = "alexnet"', "CGLSettings.archs expects tuple[str, ...]"),
    ("nad", "model_overrides = { vgg16_bn = 3 }", "NADSettings.model_overrides expects Mapping[str, Mapping[str, Any]]"),
    ("runtime", "seeds = 0", "RuntimeSettings.seeds expects tuple[int, ...]"),
    ("dissection", 'quantile = "top"', "DissectionConfig.quantile expects float"),
    ("baselines", 'layers = { resnet18 = "layer4" }', "BaselineSettings.layers expects Mapping[str, Sequence[str]]"),
])
def test_wrong_type_values_name_file_section_key_and_type(tmp_path: Path, section: str, line: str, expects: str):  # case 45
    key, value = next(iter(tomllib.loads(line).items()))
    required = {"epochs": 1, "batch_size": 8, "lr": 0.1} if section == "train" else {}
    path = tmp_path / "typo.toml"
    path.write_text(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in required.items() if k != key) + line + "\n")
    with pytest.raises(ProfileError) as error:
        load_profile(path).build(BUILT_SECTIONS[section], section)
    assert _one_line(error) == f"{path} [{section}] {key} = {value!r}: {expects}."


def test_wrong_type_in_world_profile_is_one_cli_line(tmp_path: Path):  # case 45 at the CLI
    path = tmp_path / "typo.toml"
    path.write_text(TINY_WORLD.replace("n_images = 12", 'n_images = "ten"'))
    assert _cli_error(["world", "--profile", str(path), "--out", str(tmp_path / "w")]) == (
        f"error: {path} [world] n_images = 'ten': WorldConfig.n_images expects int.")
    assert not (tmp_path / "w").exists()


@dataclasses.dataclass(frozen=True)
class _Annotated:
    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: Optional[str] = None
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = ()
    anything: object = None


@pytest.mark.parametrize("line, fits", [
    ("rate = 2", True), ("rate = true", False), ("count = true", False), ("flag = 0", False), ("flag = true", True),
    ('name = "x"', True), ("name = 3", False), ('mode = "b"', True), ('mode = "c"', False),
    ("sizes = [1, 2, 3]", True), ("sizes = [1, 2.5]", False), ("sizes = 3", False), ('anything = "x"', True),
])
def test_type_check_follows_the_annotations(tmp_path: Path, line: str, fits: bool):
    path = tmp_path / "p.toml"
    path.write_text(f"[s]\n{line}\n")
    if fits:
        load_profile(path).build(_Annotated, "s")
    else:
        with pytest.raises(ProfileError, match=rf"\[s\] {line.split(' = ')[0]} = "):
            load_profile(path).build(_Annotated, "s")


@pytest.mark.parametrize("name", available_profiles())
def test_every_shipped_profile_builds_every_dataclass_section(name: str, paper_placeholders):
    profile = load_profile(name)
    built = [profile.build(cls, section) for section, cls in BUILT_SECTIONS.items() if section in profile.sections]
    assert len(built) >= 6


def test_missing_section_key_names_profile_section_key_and_file(tmp_path: Path):  # case 52
    path = tmp_path / "short.toml"
    path.write_text('[dissection]\nsplit = "val"\n')
    settings = load_profile(path).section("dissection")
    with pytest.raises(KeyError) as error:
        settings["batch_size"]
    assert error.value.args[0] == (f"profile 'short' section [dissection] has no key 'batch_size'; "
                                   f"add it to {path} (keys there: ['split']).")
    assert settings.get("batch_size") is None and dict(settings) == {"split": "val"}


def test_unknown_section_and_invalid_value_are_one_line(tmp_path: Path):  # cases 43, 44
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_WORLD.replace("n_images = 12", "n_images = 0"))
    assert "has no [nope] section" in _cli_error(["world", "--profile", str(path), "--out", str(tmp_path / "w"),
                                                   "--section", "nope"])
    assert "n_images = 0 must be at least 1" in _cli_error(["world", "--profile", str(path), "--out", str(tmp_path / "w")])


# ---------------------------------------------------------------- command line (cases 42, 46-49)
@pytest.mark.parametrize("only", ["", ",", " , "])
def test_only_naming_no_notebook_never_runs_everything(only: str, monkeypatch, capsys):  # case 42
    import replication.reproduce

    monkeypatch.setattr(replication.reproduce, "reproduce", lambda **_: pytest.fail("reproduce ran"))
    with pytest.raises(SystemExit) as exit_info:
        main(["reproduce", "--profile", "ci", "--only", only])
    assert exit_info.value.code == 2 and "argument --only: " in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "x", "1.5"])
def test_negative_seed_is_rejected_naming_the_flag(tmp_path: Path, seed: str, capsys):  # case 46
    with pytest.raises(SystemExit) as exit_info:
        main(["world", "--profile", "ci", "--out", str(tmp_path / "w"), "--seed", seed])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument --seed: expected a non-negative integer, got '{seed}'" in err


def _raise_os_error(code: int, filename: Path):
    def fail(*_args, **_kwargs):
        raise OSError(code, os.strerror(code), str(filename))

    return fail


@pytest.mark.parametrize("code, advice", [
    (errno.EROFS, "the file system is read-only; choose a writable folder."),
    (errno.ENOSPC, "the disk is full; free disk space or choose a folder on another disk."),
])
def test_world_os_errors_are_one_line_with_advice(tmp_path: Path, monkeypatch, code: int, advice: str):  # cases 47, 48
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY_WORLD)
    target = tmp_path / "ro" / "images" / "cw_000000.png"
    monkeypatch.setattr(cw, "generate_world", _raise_os_error(code, target))
    assert _cli_error(["world", "--profile", str(profile), "--out", str(tmp_path / "ro")]) == (
        f"error: cannot write {target}: {os.strerror(code)}; {advice}")


@pytest.mark.parametrize("variable, code", [("REPLICATION_RESULTS", errno.EROFS), ("REPLICATION_DATA", errno.EACCES)])
def test_reproduce_os_errors_name_the_variable_that_moves_the_folder(tmp_path: Path, monkeypatch, variable: str,
                                                                     code: int):  # case 49
    import replication.reproduce

    monkeypatch.setenv(variable, str(tmp_path / "root"))
    target = tmp_path / "root" / "00_concept_world" / "table.csv"
    monkeypatch.setattr(replication.reproduce, "reproduce", _raise_os_error(code, target))
    message = _cli_error(["reproduce", "--profile", "ci"])
    assert message.startswith(f"error: cannot {'write' if code == errno.EROFS else 'access'} {target}: {os.strerror(code)}; ")
    assert f"(set {variable} to use another folder than {tmp_path / 'root'})." in message


def test_world_on_a_full_disk_leaves_nothing_behind(tmp_path: Path, monkeypatch):  # case 48: clean-up
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY_WORLD)
    monkeypatch.setattr(cw, "_write_tables", _raise_os_error(errno.ENOSPC, tmp_path / "w" / "index.csv"))
    assert "No space left on device; the disk is full" in _cli_error(
        ["world", "--profile", str(profile), "--out", str(tmp_path / "w")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]
