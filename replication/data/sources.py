"""Where a notebook's images come from under a profile: ConceptWorld, or real data (`paper` profile).

One rule for every notebook: a profile with a `[broden]` section reads real data, the notebook's own
`data_root` (class folders in the ImageFolder layout: an ImageNet or Places365 copy) for
classification and `[broden] root` (an unpacked `broden1_224`) for concept labels. A profile without
one generates (or finds in the cache) the ConceptWorld of its world section and reads both from it:
a world is a Broden folder that also holds a classification task. Notebooks branch on nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from replication.data.concept_world import WorldConfig, ensure_world
from replication.profiles import Profile

REAL_DATA_SECTION = "broden"


@dataclass(frozen=True)
class BrodenSource:
    """The `[broden]` section: `root`, an unpacked Broden folder (`broden1_224`: index.csv, images/...)."""

    root: str


@dataclass(frozen=True)
class DataSources:
    """A notebook's data folders: `classification` (a `ClassificationDataset` root), `broden` (a
    `BrodenDataset` root) and `real` (real data rather than ConceptWorld, where both are one folder)."""

    classification: Path
    broden: Path
    real: bool

    @property
    def kind(self) -> str:
        """What the notebook reads, in words: "real data" or "ConceptWorld"."""
        return "real data" if self.real else "ConceptWorld"


def data_sources(profile: Profile, data_root: str | None, *, section: str, world_section: str = "world") -> DataSources:
    """The data folders of the notebook whose settings are the profile's `[section]` (its `data_root`):
    real data when the profile has a `[broden]` section, else the ConceptWorld of `[world_section]`."""
    if REAL_DATA_SECTION in profile.sections:
        if not data_root:
            raise ValueError(f"{profile.file} has a [broden] section (real data) but [{section}] sets no data_root; set "
                             f"data_root there to a folder of train/<class>/ and val/<class>/ image folders.")
        broden = profile.build(BrodenSource, REAL_DATA_SECTION)
        return DataSources(classification=Path(data_root), broden=Path(broden.root), real=True)
    if data_root:
        raise ValueError(f"{profile.file} [{section}] sets data_root but the profile has no [broden] section for its "
                         f"concept labels; add [broden] root = <unpacked broden1_224> or remove data_root to use ConceptWorld.")
    world = ensure_world(profile.build(WorldConfig, world_section))
    return DataSources(classification=world, broden=world, real=False)


def world_only(sources: DataSources, what: str) -> bool:
    """Whether a ConceptWorld-only step (`what`, with why in words) runs; on real data it says so in
    one printed line and the notebook skips it."""
    if sources.real:
        print(f"{what}: ConceptWorld only; skipped on real data.")
    return not sources.real
