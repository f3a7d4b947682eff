"""Reusable model transforms and mode switches: what several papers do to a network around their method.

`eval_mode` and `frozen` are context managers that restore exactly what they changed, so analysis code
never leaves a model in another mode than it found it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block; restore each module's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
