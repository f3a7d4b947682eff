"""Seeded random rotations and their fractional powers (Network Dissection's axis-alignment test).

`random_rotation(D, seed)` draws Q uniformly (Haar) from SO(D); `fractional_rotation(Q, α)` gives the
real orthogonal Q^α that interpolates from the identity (α = 0) to Q (α = 1), so a layer's basis can
be turned gradually away from its units (spec section 6). Both return float64 tensors; pass them as
`basis=` to `dissection.dissect`.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    """A Haar-random rotation of R^dim: QR of a Gaussian matrix, signs fixed by diag(R), det forced to +1."""
    if dim < 1:
        raise ValueError(f"random_rotation needs dim >= 1, got {dim}; pass the layer's channel count.")
    gaussian = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)  # makes the factorisation unique, hence Q Haar-distributed
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]  # reflection -> rotation
    return torch.from_numpy(q)


def fractional_rotation(rotation: torch.Tensor | np.ndarray, alpha: float, *, atol: float = 1e-8) -> torch.Tensor:
    """Q^alpha for a rotation Q (orthogonal, det +1), via the real Schur form Q = Z T Z^T.

    For an orthogonal matrix T is block diagonal: 2×2 blocks are plane rotations by θ (raised to
    angle αθ), 1×1 blocks are +1 (kept) or -1; the -1 eigenvalues come in pairs (det +1) and each
    pair is a rotation by π in its plane (raised to απ). The result is real orthogonal with
    Q^0 = I, Q^1 = Q and Q^a Q^b = Q^(a+b).
    """
    q = np.asarray(rotation.detach().cpu() if torch.is_tensor(rotation) else rotation, dtype=np.float64)
    dim = q.shape[0]
    if q.ndim != 2 or q.shape[1] != dim or not np.allclose(q @ q.T, np.eye(dim), atol=1e-6):
        raise ValueError("fractional_rotation needs a square orthogonal matrix; build one with random_rotation.")
    if np.linalg.det(q) < 0:
        raise ValueError("fractional_rotation needs det(Q) = +1 (a rotation); a reflection has no real powers.")
    schur, basis = scipy.linalg.schur(q, output="real")
    powered = np.zeros_like(schur)
    negatives: list[int] = []
    i = 0
    while i < dim:
        if i + 1 < dim and abs(schur[i + 1, i]) > atol:
            cos = (schur[i, i] + schur[i + 1, i + 1]) / 2
            sin = (schur[i + 1, i] - schur[i, i + 1]) / 2
            powered[i : i + 2, i : i + 2] = _plane_rotation(alpha * np.arctan2(sin, cos))
            i += 2
            continue
        if schur[i, i] > 0:
            powered[i, i] = 1.0
        else:
            negatives.append(i)
        i += 1
    for a, b in zip(negatives[0::2], negatives[1::2]):
        powered[np.ix_([a, b], [a, b])] = _plane_rotation(alpha * np.pi)
    return torch.from_numpy(basis @ powered @ basis.T)


def _plane_rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
