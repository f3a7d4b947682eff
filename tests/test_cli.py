"""The command line: `python -m replication world|reproduce`."""
from __future__ import annotations

from pathlib import Path

import pytest

from replication.cli import main
from replication.data.broden import BrodenDataset


@pytest.fixture()
def tiny_profile(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text('[runtime]\nseeds = [0]\n\n[world]\npreset = "classification"\nn_images = 12\nimage_size = 32\nseed = 3\n')
    return path


def test_world_writes_a_readable_broden_folder_and_seed_overrides(tiny_profile: Path, tmp_path: Path, capsys):
    main(["world", "--profile", str(tiny_profile), "--out", str(tmp_path / "w"), "--seed", "5"])
    assert "seed 5" in capsys.readouterr().out
    assert len(BrodenDataset(tmp_path / "w")) == 12


def test_world_refuses_to_overwrite_without_the_flag(tiny_profile: Path, tmp_path: Path):
    main(["world", "--profile", str(tiny_profile), "--out", str(tmp_path / "w")])
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["world", "--profile", str(tiny_profile), "--out", str(tmp_path / "w")])
    main(["world", "--profile", str(tiny_profile), "--out", str(tmp_path / "w"), "--overwrite"])


def test_bad_profile_is_a_one_line_error():
    with pytest.raises(SystemExit, match="unknown profile 'nope'"):
        main(["reproduce", "--profile", "nope"])
