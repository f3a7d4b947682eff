"""Shared test helpers: tolerance checks with informative messages, in the style of Captum's tests."""
from __future__ import annotations

import numpy as np
import torch


def _float64(value) -> torch.Tensor:
    """A float64 CPU copy of a tensor, array or scalar (a copy, so read-only arrays are fine)."""
    if torch.is_tensor(value):
        return value.detach().cpu().to(torch.float64).clone()
    return torch.from_numpy(np.array(value, dtype=np.float64))


def assert_close(actual, expected, *, atol: float = 1e-6, rtol: float = 1e-5, msg: str = "") -> None:
    """Element-wise closeness for tensors, arrays or scalars, reporting the worst offender."""
    actual_t, expected_t = _float64(actual), _float64(expected)
    assert actual_t.shape == expected_t.shape, f"{msg} shape {tuple(actual_t.shape)} != {tuple(expected_t.shape)}"
    diff = (actual_t - expected_t).abs()
    bound = atol + rtol * expected_t.abs()
    if not bool((diff <= bound).all()):
        worst = int(torch.argmax(diff - bound))
        raise AssertionError(
            f"{msg} not close: worst at flat index {worst}: actual {actual_t.flatten()[worst].item()!r}, "
            f"expected {expected_t.flatten()[worst].item()!r} (atol={atol}, rtol={rtol})"
        )
