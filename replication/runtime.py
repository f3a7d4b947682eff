"""Seeds, devices and progress bars shared by every long-running loop."""
from __future__ import annotations

import os
import random
import sys
from typing import Iterable, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when available; asking for CUDA without one is a clear error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!s} was requested but CUDA is not available; use device='cpu'.")
    return device


def progress_enabled() -> bool:
    """Bars are off under CI (`CI` set), when `REPLICATION_QUIET` is set, or with no terminal/notebook."""
    if os.environ.get("CI") or os.environ.get("REPLICATION_QUIET"):
        return False
    return True


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False) -> Iterable[T]:
    """A tqdm bar over `iterable`, silent under CI."""
    if not progress_enabled():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr)
