"""Random rotations: orthogonal, det +1, seeded; fractional powers form a one-parameter group."""
import numpy as np
import pytest
import torch

from replication.analysis.rotation import fractional_rotation, random_rotation
from tests.helpers import assert_close


@pytest.mark.parametrize("dim", [1, 2, 5, 16])
def test_random_rotation_is_special_orthogonal_and_seeded(dim):
    q = random_rotation(dim, seed=3)
    assert q.dtype == torch.float64
    assert_close(q @ q.T, torch.eye(dim), atol=1e-12)
    assert_close(torch.linalg.det(q), 1.0, atol=1e-10)
    assert torch.equal(q, random_rotation(dim, seed=3))
    if dim > 1:
        assert not torch.allclose(q, random_rotation(dim, seed=4))


@pytest.mark.parametrize("dim", [2, 7, 16])
def test_fractional_powers(dim):
    q = random_rotation(dim, seed=0)
    assert_close(fractional_rotation(q, 0.0), torch.eye(dim), atol=1e-10)
    assert_close(fractional_rotation(q, 1.0), q, atol=1e-10)
    half = fractional_rotation(q, 0.5)
    assert_close(half @ half.T, torch.eye(dim), atol=1e-10)
    assert_close(torch.linalg.det(half), 1.0, atol=1e-10)
    assert_close(half @ half, q, atol=1e-9)
    assert_close(fractional_rotation(q, 0.3) @ fractional_rotation(q, 0.45), fractional_rotation(q, 0.75), atol=1e-9)


def test_fractional_power_of_plane_rotation_and_of_minus_identity():
    angle = 1.2
    plane = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float64)
    third = torch.tensor([[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]], dtype=torch.float64)
    assert_close(fractional_rotation(plane, 1 / 3), third, atol=1e-12)
    # -I in 4-d: real eigenvalues -1 paired into two half-turns; the square root must still be real.
    root = fractional_rotation(-torch.eye(4, dtype=torch.float64), 0.5)
    assert_close(root @ root, -torch.eye(4), atol=1e-12)
    assert_close(root @ root.T, torch.eye(4), atol=1e-12)


def test_fractional_rotation_rejects_reflections():
    with pytest.raises(ValueError, match="det"):
        fractional_rotation(torch.diag(torch.tensor([1.0, -1.0])), 0.5)
    with pytest.raises(ValueError, match="orthogonal"):
        fractional_rotation(torch.ones(3, 3), 0.5)
