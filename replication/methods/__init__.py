"""Each replicated paper's method, one package per method, named after what it does.

Every experiment package follows one convention (documented, not a base class): a `Settings`
dataclass built from its profile section (e.g. `NADSettings` from [nad]), its run functions,
`claim_results(...) -> list[ClaimResult]` (the notebook's claims table) and its figure functions.
Its `__init__` re-exports these names. `EXPERIMENTS` maps a notebook number to its experiment package.
"""
from types import ModuleType

from replication.methods import attention_pooling, concept_groups, concept_whitening, gated_paths, interpretable_basis

EXPERIMENTS: dict[str, ModuleType] = {
    "01": concept_whitening,
    "02": attention_pooling,
    "03": concept_groups,
    "04": interpretable_basis,
    "05": gated_paths,
}
