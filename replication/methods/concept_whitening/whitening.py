"""The concept whitening (CW) layer of Chen, Bei & Rudin (2020), exactly as spec 01 sections 3.3-3.6
describe it: IterNorm whitening (Newton iterations with trace normalisation, running statistics), an
orthogonal rotation R whose rows are the concept axes, the four activation modes, the alignment
gradient accumulated from concept batches and the Cayley transform with curvilinear search.

Guards against the NaNs users of the official code hit (its issue #12): covariance and Newton
iterations in float64 (`solve_dtype`), a finite check on every gradient matrix, the Cayley step solved
in float64, and a line search that fails (no step size meets Armijo and Wolfe) skipping the update
instead of taking it; each skipped update is counted in the layer's `skipped_updates` buffer and logged.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from replication.models.hooks import get_module
from replication.models.surgery import replace_module

LOG = logging.getLogger(__name__)
ACTIVATION_MODES = ("mean", "max", "pos_mean", "pool_max")
POOL = 3  # pool_max: 3 x 3 max-pool with stride 3, then the spatial mean
# one row of a CW layer's `trace` per Cayley step (cayley_step 0: the whole update skipped, G not finite)
TRACE_COLUMNS = ("update", "cayley_step", "before", "after", "tau", "bisections", "accepted")


def iternorm_matrix(centred: torch.Tensor, *, iterations: int = 10, eps: float = 1e-5) -> torch.Tensor:
    """IterNorm's whitening matrix W ≈ Σ^(-1/2) of a d × m matrix of centred columns: Σ = X Xᵀ/m + eps·I,
    Σ_N = Σ / tr(Σ), P_0 = I, P_{k+1} = 1.5 P_k - 0.5 P_k³ Σ_N for `iterations` steps, W = P_T / sqrt(tr Σ).
    Computed in the dtype of `centred` (pass float64: float32 diverges at T = 10 on ill-conditioned Σ)."""
    d, m = centred.shape
    sigma = centred @ centred.T / m + eps * torch.eye(d, dtype=centred.dtype, device=centred.device)
    trace = sigma.diagonal().sum()
    sigma_n = sigma / trace
    p = torch.eye(d, dtype=centred.dtype, device=centred.device)
    for _ in range(iterations):
        p = 1.5 * p - 0.5 * torch.linalg.matrix_power(p, 3) @ sigma_n
    return p / trace.sqrt()


def _pool_kernel(maps: torch.Tensor) -> int:
    """pool_max's block size: 3, or the map's own size when it is smaller."""
    return min(POOL, maps.shape[2], maps.shape[3])


def axis_activations(maps: torch.Tensor, mode: str = "pool_max") -> torch.Tensor:
    """One scalar per image and channel of N × C × h × w maps (CW's activation modes): `mean`, `max`,
    `pos_mean` (mean of the positive values, 0 without any) or `pool_max` (3 × 3 max-pool, stride 3,
    then the mean; maps smaller than 3 pool with their own size)."""
    if mode == "mean":
        return maps.mean((2, 3))
    if mode == "max":
        return maps.amax((2, 3))
    if mode == "pos_mean":
        positive = (maps > 0).to(maps.dtype)
        return (maps * positive).sum((2, 3)) / (positive.sum((2, 3)) + 1e-4)
    if mode == "pool_max":
        kernel = _pool_kernel(maps)
        return F.max_pool2d(maps, kernel, stride=kernel).mean((2, 3))
    raise ValueError(f"activation mode {mode!r}; choose one of {ACTIVATION_MODES}.")


def alignment_gradient(xhat: torch.Tensor, rotated: torch.Tensor, mode: str = "pool_max") -> torch.Tensor:
    """The official code's gradient row for one concept batch (spec 3.5): component i is minus the
    batch mean of the un-rotated whitened map `xhat` of channel i, averaged over the positions selected
    by the activation mode on the *rotated* map of the same channel i (all positions for `mean`; the
    positions of the maximum for `max`; positive positions for `pos_mean`, over count + 1e-4; the maximum
    of every 3 × 3 block for `pool_max`, each block's arg max once). Returns a C vector."""
    if mode == "mean":
        return -xhat.mean((0, 2, 3))
    if mode == "max":
        mask = (rotated == rotated.amax((2, 3), keepdim=True)).to(xhat.dtype)
        return -((xhat * mask).sum((2, 3)) / mask.sum((2, 3))).mean(0)
    if mode == "pos_mean":
        mask = (rotated > 0).to(xhat.dtype)
        return -((xhat * mask).sum((2, 3)) / (mask.sum((2, 3)) + 1e-4)).mean(0)
    if mode == "pool_max":
        kernel = _pool_kernel(rotated)
        _, indices = F.max_pool2d(rotated, kernel, stride=kernel, return_indices=True)
        mask = torch.zeros_like(rotated).flatten(2).scatter_(2, indices.flatten(2), 1.0).view_as(rotated).to(xhat.dtype)
        return -((xhat * mask).sum((2, 3)) / mask.sum((2, 3))).mean(0)
    raise ValueError(f"activation mode {mode!r}; choose one of {ACTIVATION_MODES}.")


@dataclass(frozen=True)
class CayleyResult:
    """One Cayley update: the new rotation (the old one when the search failed), the step size tried
    last, the objective F = <G, R> before and after, the bisections used and whether it succeeded."""

    rotation: torch.Tensor
    tau: float
    before: float
    after: float
    bisections: int
    accepted: bool


def cayley_step(rotation: torch.Tensor, gradient: torch.Tensor, *, tau: float = 1000.0, upper: float = 1e8,
                c1: float = 1e-4, c2: float = 0.9, max_bisections: int = 500) -> CayleyResult:
    """One step of Wen & Yin's curvilinear search that lowers F(R) = <G, R> on the orthogonal group
    (CW maximises alignment = -F): A = G Rᵀ - R Gᵀ, Y(τ) = (I + τ/2 A)⁻¹ (I - τ/2 A) R, τ bisected in
    [0, `upper`] from `tau` until Armijo (F(Y) ≤ F(R) + c1 τ F'(0), F'(0) = -½‖A‖²) and the weak Wolfe
    condition (F'(τ) ≥ c2 F'(0)) hold, each with 1e-18 slack. Solved in float64. When no τ passes after
    `max_bisections` bisections the rotation is returned unchanged (`accepted` False; the official code
    takes the untested step)."""
    r, g = rotation.double(), gradient.double()
    eye = torch.eye(r.shape[0], dtype=torch.float64, device=r.device)
    a = g @ r.T - r @ g.T
    before = float((g * r).sum())
    slope0 = -0.5 * float((a * a).sum())
    low, high = 0.0, upper
    for bisection in range(max_bisections + 1):
        left = eye + 0.5 * tau * a
        candidate = torch.linalg.solve(left, (eye - 0.5 * tau * a) @ r)
        value = float((g * candidate).sum())
        slope = -float((g * (torch.linalg.solve(left, a) @ (0.5 * (r + candidate)))).sum())
        if value > before + c1 * tau * slope0 + 1e-18:
            high, tau = tau, 0.5 * (low + tau)
        elif slope + 1e-18 < c2 * slope0:
            low, tau = tau, 0.5 * (tau + high)
        else:
            return CayleyResult(candidate.to(rotation.dtype), tau, before, value, bisection, True)
    return CayleyResult(rotation, tau, before, before, max_bisections, False)


class ConceptWhitening(nn.Module):
    """A BatchNorm replacement: whitening ψ(z) = W (z - μ) then the rotation, output channel d = Σ_c R[d, c] ψ_c;
    the rows of R are the concept axes (axis j = concept j of the alignment). No affine parameters.

    Training mode whitens with the batch's μ and W (autograd through the Newton iterations) and updates
    the running buffers with `momentum`; eval mode uses the running buffers. Inside `record(j)` (used by
    `alignment.ConceptAlignment`) a forward also computes that concept batch's alignment gradient row
    (`alignment_gradient`) and counts one batch for axis j (`counter[j]`). `activation` is applied
    after the rotation (timm's BatchNormAct2d applies its own; ResNet's bn1 needs none). The rotated map
    passes through `self.rotated` (an identity) so hooks can read it."""

    def __init__(self, channels: int, *, iterations: int = 10, eps: float = 1e-5, momentum: float = 0.05,
                 mode: str = "pool_max", solve_dtype: torch.dtype = torch.float64, activation: nn.Module | None = None):
        super().__init__()
        if mode not in ACTIVATION_MODES:
            raise ValueError(f"ConceptWhitening mode {mode!r}; choose one of {ACTIVATION_MODES}.")
        if iterations < 1 or not 0 < momentum <= 1 or eps <= 0:
            raise ValueError(f"ConceptWhitening needs iterations >= 1, 0 < momentum <= 1 and eps > 0; got "
                             f"{iterations}, {momentum}, {eps}.")
        self.channels, self.iterations, self.eps, self.momentum, self.mode = channels, iterations, eps, momentum, mode
        self.solve_dtype = solve_dtype
        self.activation = activation if activation is not None else nn.Identity()
        self.rotated = nn.Identity()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_wm", torch.eye(channels))
        self.register_buffer("running_rot", torch.eye(channels))
        self.register_buffer("sum_G", torch.zeros(channels, channels))
        # the official code's per-concept counter: concept batches per axis since the last rotation update
        self.register_buffer("counter", torch.full((channels,), 0.001, dtype=torch.float64))
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("dropped_rows", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("trace", torch.zeros(0, len(TRACE_COLUMNS), dtype=torch.float64))
        self._recording: tuple[int, list[torch.Tensor]] | None = None

    @contextmanager
    def record(self, axis: int) -> Iterator[list[torch.Tensor]]:
        """Within the block every forward is one concept batch of axis `axis`: its gradient row is appended
        to the yielded list and `counter[axis]` grows by one (the official code's `mode` = axis)."""
        if not 0 <= axis < self.channels:
            raise ValueError(f"concept axis {axis} does not exist in a ConceptWhitening layer of {self.channels} channels.")
        rows: list[torch.Tensor] = []
        self._recording = (axis, rows)
        try:
            yield rows
        finally:
            self._recording = None

    growing_buffers = ("trace",)  # its saved length is taken on loading (`backbones.load_weights` allows it)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "trace")
        if saved is not None:  # the trace grows with every update: take the saved one's length
            self.trace = torch.zeros_like(saved, dtype=self.trace.dtype, device=self.trace.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _log_step(self, cayley_step: int, result: CayleyResult | None) -> None:
        row = ([self.updates.item(), cayley_step, result.before, result.after, result.tau, result.bisections,
                float(result.accepted)] if result is not None else [self.updates.item(), 0] + [math.nan] * 3 + [0, 0])
        self.trace = torch.cat([self.trace, torch.tensor([row], dtype=self.trace.dtype, device=self.trace.device)])

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """ψ(x): the whitened, un-rotated map (batch statistics in training mode, running ones in eval)."""
        n, c, h, w = x.shape
        if c != self.channels:
            raise ValueError(f"ConceptWhitening built for {self.channels} channels got a map with {c}.")
        columns = x.transpose(0, 1).reshape(c, -1)
        if self.training:
            if columns.shape[1] < 2:
                raise ValueError("ConceptWhitening in training mode needs more than one value per channel "
                                 "(batch x height x width >= 2); use eval mode for single positions.")
            solve = columns.to(self.solve_dtype)
            mean = solve.mean(1, keepdim=True)
            wm = iternorm_matrix(solve - mean, iterations=self.iterations, eps=self.eps)
            with torch.no_grad():
                self.running_mean.lerp_(mean.squeeze(1).to(self.running_mean.dtype), self.momentum)
                self.running_wm.lerp_(wm.to(self.running_wm.dtype), self.momentum)
            whitened = (wm @ (solve - mean)).to(x.dtype)
        else:
            whitened = self.running_wm.to(x.dtype) @ (columns - self.running_mean.to(x.dtype)[:, None])
        return whitened.reshape(c, n, h, w).transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xhat = self.whiten(x)
        rotated = torch.einsum("dc,nchw->ndhw", self.running_rot.to(x.dtype), xhat)
        if self._recording is not None:
            axis, rows = self._recording
            with torch.no_grad():
                rows.append(alignment_gradient(xhat.double(), rotated.double(), self.mode))
                self.counter[axis] += 1
        return self.activation(self.rotated(rotated))

    def accumulate(self, rows: dict[int, torch.Tensor]) -> None:
        """Add gradient rows (axis -> C vector) into the persistent moving average
        sum_G[j] <- m g_j + (1 - m) sum_G[j] (m = `momentum`, sum_G never reset), as the official code does
        per concept batch. A row that is not finite is dropped (sum_G[j] keeps its value), logged and
        counted in `dropped_rows`, so one corrupt batch cannot poison the never-reset average."""
        for axis, row in rows.items():
            if not torch.isfinite(row).all():
                self.dropped_rows += 1
                LOG.warning("concept whitening: the gradient row of axis %d is not finite; row dropped.", axis)
                continue
            self.sum_G[axis] = self.momentum * row.to(self.sum_G.dtype) + (1 - self.momentum) * self.sum_G[axis]

    def gradient(self) -> torch.Tensor:
        """The official update's G = sum_G / counter[:, None] (float64): each row divided by its own axis's
        count of concept batches since the last update (+0.001, so rows without a batch are sum_G x 1000, as
        in the official code). With one batch per concept per update (the official training loop's and
        `ConceptAlignment`'s schedule) row j is sum_G[j] / 1.001."""
        return self.sum_G.double() / self.counter[:, None]

    def update_rotation(self, *, steps: int = 2, reorthonormalise: bool = True, **search) -> list[CayleyResult]:
        """`steps` Cayley updates with G = `gradient()` (the same G for both), then the counters reset to
        0.001. A G that is not finite, or a failed line search, leaves R unchanged and is logged and counted in
        `skipped_updates`. `reorthonormalise` projects R back onto the orthogonal group (QR, signs kept).
        Every Cayley step (F before and after, the accepted τ, bisections, accepted) or skipped update is
        appended to the `trace` buffer (`TRACE_COLUMNS`), saved with the model."""
        gradient = self.gradient()
        results = []
        self.updates += 1
        if not torch.isfinite(gradient).all():
            self.skipped_updates += 1
            self._log_step(0, None)
            LOG.warning("concept whitening: the alignment gradient is not finite; rotation update skipped.")
        else:
            for step in range(1, steps + 1):
                result = cayley_step(self.running_rot, gradient, **search)
                results.append(result)
                self._log_step(step, result)
                if not result.accepted:
                    self.skipped_updates += 1
                    LOG.warning("concept whitening: the Cayley line search failed (tau %.3g); update skipped.", result.tau)
                    break
                rotation = result.rotation.double()
                if reorthonormalise:
                    q, r = torch.linalg.qr(rotation.T)
                    rotation = (q * torch.sign(r.diagonal())).T
                self.running_rot.copy_(rotation.to(self.running_rot.dtype))
        self.counter.fill_(0.001)
        return results


def replace_with_cw(model: nn.Module, names: Sequence[str], **options) -> dict[str, ConceptWhitening]:
    """Replace each named BatchNorm of `model` by a `ConceptWhitening` layer of its channel count (through
    `models.surgery.replace_module`); the BN's statistics and affine weights are discarded (spec 3.5). A
    timm BatchNormAct2d's activation is kept after the rotation, and each CW layer lives on its BN's device.
    Every name is checked before any is replaced, so a wrong one leaves `model` unchanged. Returns name -> CW layer."""
    olds = {name: get_module(model, name) for name in names}
    wrong = {name: type(old).__name__ for name, old in olds.items() if not isinstance(old, nn.BatchNorm2d)}
    if wrong:
        raise ValueError(f"{wrong} are not BatchNorm2d layers; concept whitening replaces BatchNorm layers.")
    layers = {}
    for name, old in olds.items():
        layer = ConceptWhitening(old.num_features, activation=getattr(old, "act", None), **options)
        device = next(chain(old.parameters(), old.buffers()), torch.empty(0)).device
        replace_module(model, name, layer.to(device))
        layers[name] = layer
    return layers


def check_orthogonal(rotation: torch.Tensor) -> float:
    """max |R Rᵀ - I|: how far a rotation has drifted from orthogonality."""
    r = rotation.double()
    eye = torch.eye(r.shape[0], dtype=torch.float64, device=r.device)
    return float((r @ r.T - eye).abs().max()) if r.numel() else math.nan
