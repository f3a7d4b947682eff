"""Seeds, devices, CPU threads and progress bars shared by every long-running loop."""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch
from tqdm.std import tqdm

T = TypeVar("T")

FALSE_WORDS = ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class RuntimeSettings:
    """A profile's [runtime] section: where and how every notebook computes.

    `threads`: torch's CPU thread count (`set_cpu_threads`; it changes float rounding, so a profile
    pins it); `batch_size`: for evaluation and analysis passes (training batches are `TrainConfig`'s);
    `device`: "auto" (CUDA when available), "cpu" or "cuda[:n]" (`resolve_device`); `seeds`: the
    training seeds a notebook repeats its experiments over.
    """

    threads: int
    batch_size: int
    device: str = "auto"
    seeds: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"[runtime] batch_size must be a positive integer, got {self.batch_size!r}.")
        if not self.seeds:
            raise ValueError("[runtime] seeds is empty; list at least one seed, e.g. seeds = [0].")


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


def set_cpu_threads(threads: int) -> int:
    """Pin torch's CPU thread count. CPU kernels split their sums by thread, so the count changes the
    float rounding of every result: a profile fixes it rather than inheriting the machine's core count."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer (torch's CPU thread count); got {threads!r}.")
    torch.set_num_threads(threads)
    return threads


def compute_identity(device: str | torch.device | None) -> dict[str, str | int]:
    """What besides the configuration decides a computation's float results, for cache keys: the device
    type, and on the CPU the thread count (on CUDA it does not enter the kernels)."""
    kind = resolve_device(device).type
    return {"device_type": kind, "cpu_threads": torch.get_num_threads()} if kind == "cpu" else {"device_type": kind}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in FALSE_WORDS


def progress_enabled() -> bool:
    """Bars are off under CI (`CI` set to anything but false/0) and when `REPLICATION_QUIET` is set."""
    return not (_flag("CI") or _flag("REPLICATION_QUIET"))


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, leave: bool = False) -> Iterable[T]:
    """A text bar over `iterable`, silent under CI.

    The bar is advanced by hand and never iterates `iterable` itself: tqdm's wrappers call `iter()`
    on it in their constructor, and on a DataLoader that extra iterator draws from the shuffling
    generator, so bars on or off would change the training data order.
    """
    if not progress_enabled():
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return _advance(iterable, desc, total, leave)


def _advance(iterable: Iterable[T], desc: str, total: int | None, leave: bool) -> Iterator[T]:
    with tqdm(total=total, desc=desc, leave=leave, file=sys.stderr) as bar:
        for item in iterable:
            yield item
            bar.update(1)
