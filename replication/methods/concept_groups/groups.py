"""CGL's concept groups: the filters of a layer split into G contiguous groups, and each group's weight norm.

The partition is fixed before training (the remainder, or a stated number of trailing filters, stays
free) [P][C]; the group weight norm beta_gl = ||w_gl||_F is both the block norm's summand and the
relevance of a group [P].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GROUPS = 5  # G, the same in every layer [C]


@dataclass(frozen=True)
class GroupPartition:
    """Filters 0..F-1 split into `groups` contiguous blocks of `group_size`; the rest (trailing) free."""

    num_filters: int
    groups: int
    group_size: int

    @property
    def grouped(self) -> int:
        """Number of filters that belong to a group (the first `grouped` channels)."""
        return self.groups * self.group_size

    @property
    def free(self) -> int:
        return self.num_filters - self.grouped

    def group_of(self) -> torch.Tensor:
        """Group index of every filter (LongTensor of length F), -1 for free filters."""
        index = torch.full((self.num_filters,), -1, dtype=torch.long)
        index[: self.grouped] = torch.arange(self.groups).repeat_interleave(self.group_size)
        return index

    def split(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """The grouped filters of `tensor` along `dim`, reshaped to (..., G, N_g, ...)."""
        grouped = tensor.narrow(dim, 0, self.grouped)
        shape = (*grouped.shape[:dim], self.groups, self.group_size, *grouped.shape[dim + 1 :])
        return grouped.reshape(shape)


def partition_filters(num_filters: int, groups: int = GROUPS, free_filters: int | None = None, *,
                      min_size: int = 1) -> GroupPartition:
    """Contiguous concept groups over `num_filters` filters.

    `free_filters=None` follows the code: groups of floor(F/G) filters, the remainder free [C].
    An explicit `free_filters` keeps that many trailing filters free and needs F - free to be a
    multiple of G (the paper's F = G*f plus optional free filters [P]). `min_size` is the smallest
    group accepted (2 where within-group pairs are needed).
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}; the paper's default is {GROUPS}.")
    if free_filters is None:
        group_size = num_filters // groups
    else:
        if not 0 <= free_filters < num_filters or (num_filters - free_filters) % groups:
            raise ValueError(
                f"cannot split {num_filters} filters into {groups} equal groups with {free_filters} free "
                f"filters; choose free_filters so that num_filters - free_filters is a positive multiple of groups."
            )
        group_size = (num_filters - free_filters) // groups
    if group_size < min_size:
        raise ValueError(
            f"{num_filters} filters in {groups} groups leave {group_size} filter(s) per group; at least "
            f"{min_size} are needed{' for within-group pairs' if min_size > 1 else ''}. Use fewer groups or a wider layer."
        )
    return GroupPartition(num_filters=num_filters, groups=groups, group_size=group_size)


def group_weight_norms(weight: torch.Tensor, partition: GroupPartition) -> torch.Tensor:
    """beta_gl = ||w_gl||_F for each group of out-channels of one layer's weight (length G) [P]."""
    return torch.linalg.vector_norm(partition.split(weight, dim=0).flatten(1), dim=1)
