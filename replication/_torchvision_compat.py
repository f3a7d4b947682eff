"""Make `import torchvision` work on a CPU-only torch.

The PyPI torchvision wheel is built against CUDA; on the CPU torch its native library `_C` cannot
load, and torchvision then fails at import with "operator torchvision::nms does not exist"
(upstream pytorch/vision#9085) because it registers fake kernels for ops that were never defined.
Where (and only where) that library cannot load, we define the schemas of those ops so the import
succeeds. Nothing this project uses calls them (models, transforms, datasets, feature extraction);
calling `torchvision.ops.nms` in that state still fails, with torch's "no kernel" error.
On a torch where the library loads (e.g. a CUDA build), this module changes nothing.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

# Ops that torchvision registers fake (meta) kernels for unconditionally at import time.
_UNGUARDED_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_schema_library: torch.library.Library | None = None


def _native_library_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # torchvision absent: nothing to patch
    candidates = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def _define_missing_schemas() -> None:
    global _schema_library
    if _schema_library is not None:
        return
    _schema_library = torch.library.Library("torchvision", "DEF")
    for schema in _UNGUARDED_OP_SCHEMAS:
        _schema_library.define(schema)


if "torchvision" not in sys.modules and not _native_library_loads():
    _define_missing_schemas()
