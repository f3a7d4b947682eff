"""Shared machinery: torchvision on CPU torch, atomic writes, the config cache, profiles, claims."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import replication  # noqa: F401  (makes torchvision importable)
from replication import cache, io
from replication.profiles import ProfileError, available_profiles, load_profile
from replication.reporting.claims import ClaimResult, claims_table


def test_torchvision_imports_and_builds_models_on_this_torch():
    import torchvision
    from torchvision.models import resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    extractor = create_feature_extractor(resnet18(weights=None), {"layer4": "out"})
    assert extractor(torch.zeros(1, 3, 64, 64))["out"].shape == (1, 512, 2, 2)
    assert torchvision.__version__.startswith("0.28")


def test_atomic_path_leaves_nothing_behind_on_failure(tmp_path: Path):
    target = tmp_path / "result.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path: Path):
    target = io.write_json(tmp_path / "a" / "r.json", {"x": 1})
    io.write_json(target, {"x": 2})
    assert io.read_json(target) == {"x": 2}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_torch_checkpoints_round_trip_with_weights_only(tmp_path: Path):
    state = {"w": torch.arange(3.0), "epoch": 4}
    io.save_torch(tmp_path / "c.pt", state)
    loaded = io.load_torch(tmp_path / "c.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["epoch"] == 4


def test_saved_tensors_are_byte_reproducible(tmp_path: Path):
    """The archive's root folder must not take the random temp-file name."""
    state = {"w": torch.arange(3.0)}
    first = io.save_torch(tmp_path / "a.pt", state).read_bytes()
    assert io.save_torch(tmp_path / "b.pt", state).read_bytes() == first


def test_result_files_get_the_usual_permissions(tmp_path: Path):
    previous = os.umask(0o022)
    try:
        written = [io.write_text(tmp_path / "t.txt", "x"), io.save_torch(tmp_path / "t.pt", {"x": torch.ones(1)})]
    finally:
        os.umask(previous)
    assert [oct(p.stat().st_mode & 0o777) for p in written] == ["0o644", "0o644"]


def test_stale_scratch_of_dead_processes_is_removed(tmp_path: Path):
    target = tmp_path / "world"
    dead, mine = tmp_path / ".world.tmp-999999999", io.scratch_path(target, "tmp")
    for folder in (dead, mine):
        (folder / "images").mkdir(parents=True)
    io.remove_stale_scratch(target, "tmp")
    assert not dead.exists() and mine.exists()


def test_config_hash_is_order_independent_and_sensitive_to_values():
    @dataclasses.dataclass
    class Config:
        a: int
        b: tuple

    assert cache.config_hash({"a": 1, "b": [2]}) == cache.config_hash({"b": (2,), "a": 1})
    assert cache.config_hash(Config(1, (2,))) == cache.config_hash({"a": 1, "b": [2]})
    assert cache.config_hash({"a": 1}) != cache.config_hash({"a": 2})


def test_stage_is_done_only_after_marker(tmp_path: Path):
    folder = cache.stage_dir("model", {"a": 1}, root=tmp_path)
    assert not cache.is_done(folder)
    cache.mark_done(folder, {"a": 1}, seconds=1.0)
    assert cache.is_done(folder) and io.read_json(folder / cache.DONE_MARKER)["config"] == {"a": 1}


@pytest.mark.parametrize("name", ["ci", "default", "gpu", "paper"])
def test_every_profile_loads(name: str):
    profile = load_profile(name)
    assert profile.name == name and "runtime" in profile.sections


def test_profile_build_rejects_unknown_keys():
    @dataclasses.dataclass
    class Narrow:
        device: str

    with pytest.raises(KeyError, match="does not accept"):
        load_profile("ci").build(Narrow, "runtime")


@dataclasses.dataclass(frozen=True)
class _Inner:
    steps: int
    rate: float = 0.5
    mode: str = "a"


@dataclasses.dataclass(frozen=True)
class _Outer:
    name: str = "outer"
    inner: _Inner = _Inner(steps=3, mode="b")  # a nested table overrides these fields only


@dataclasses.dataclass(frozen=True)
class _Needs:
    inner: _Inner  # no default: a nested table builds it from scratch


@dataclasses.dataclass(frozen=True)
class _Deep:
    outer: _Outer = _Outer()


def _profile(tmp_path: Path, text: str):
    path = tmp_path / "nested.toml"
    path.write_text(text)
    return load_profile(path), path


def test_nested_table_builds_the_dataclass_field_over_its_default(tmp_path: Path):
    profile, _ = _profile(tmp_path, '[s]\nname = "x"\n[s.inner]\nrate = 2\n[t]\n[d.outer.inner]\nsteps = 9\n')
    assert profile.build(_Outer, "s") == _Outer(name="x", inner=_Inner(steps=3, rate=2, mode="b"))
    assert profile.build(_Outer, "t") == _Outer()  # no table: the default itself
    assert profile.build(_Deep, "d") == _Deep(outer=_Outer(inner=_Inner(steps=9, mode="b")))


def test_nested_table_errors_name_the_file_the_table_and_the_key(tmp_path: Path):
    profile, path = _profile(tmp_path, "[s.inner]\nsteps = 1\nspeed = 2\n")
    with pytest.raises(KeyError) as error:
        profile.build(_Outer, "s")
    assert error.value.args[0] == (f"{path} [s.inner] has keys ['speed'] that _Inner does not accept; "
                                   "valid keys: ['mode', 'rate', 'steps'].")
    profile, path = _profile(tmp_path, '[s.inner]\nsteps = "many"\n')
    with pytest.raises(ProfileError, match=rf"^{path} \[s.inner\] steps = 'many': _Inner.steps expects int.$"):
        profile.build(_Outer, "s")
    profile, path = _profile(tmp_path, "[s]\ninner = 3\n")
    with pytest.raises(ProfileError, match=r"\[s\] inner = 3: _Outer.inner expects _Inner"):
        profile.build(_Outer, "s")


def test_a_missing_required_key_is_named_with_the_file(tmp_path: Path):
    profile, path = _profile(tmp_path, "[s]\n[n.inner]\nsteps = 4\n[m.inner]\nrate = 1.0\n")
    with pytest.raises(KeyError) as error:
        profile.build(_Inner, "s")
    assert error.value.args[0] == f"{path} [s] lacks keys ['steps'] that _Inner needs (they have no default); add them there."
    assert profile.build(_Needs, "n") == _Needs(inner=_Inner(steps=4))
    with pytest.raises(KeyError, match=r"\[m.inner\] lacks keys \['steps'\]"):
        profile.build(_Needs, "m")
    with pytest.raises(KeyError, match=r"\[s\] lacks keys \['inner'\]"):
        profile.build(_Needs, "s")


def test_unknown_profile_names_the_choices():
    with pytest.raises(FileNotFoundError, match="choose one of"):
        load_profile("nonexistent")
    assert {"ci", "default", "gpu", "paper"} <= set(available_profiles())


def test_profile_expands_environment_variables(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BRODEN_DIR", str(tmp_path))
    assert load_profile("paper").section("broden")["root"] == str(tmp_path)


def test_claims_table_rejects_unknown_verdicts():
    with pytest.raises(ValueError, match="verdict"):
        ClaimResult("C1", "claim", "1", "2", "probably")
    table = claims_table([ClaimResult("C1", "claim", "1", "2", "confirmed")])
    assert list(table.columns)[:5] == ["claim_id", "claim", "paper", "ours", "verdict"]


def test_stage_lock_serialises_two_processes(tmp_path: Path):
    import multiprocessing
    import time

    def hold(folder: str, log: str) -> None:
        with cache.stage_lock(Path(folder)):
            with open(log, "a") as handle:
                handle.write("start\n")
            time.sleep(0.3)
            with open(log, "a") as handle:
                handle.write("end\n")

    log = tmp_path / "log.txt"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=hold, args=(str(tmp_path / "stage"), str(log))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert log.read_text().split() == ["start", "end", "start", "end"]
