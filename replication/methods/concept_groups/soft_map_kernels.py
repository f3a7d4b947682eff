"""Fused CPU kernels for CGL's per-layer soft-map statistics (numba), the fast path of L_g and L_s.

One layer's regularisers need psi = sigmoid(k_c a + P2) of every map and, from psi, three small
tables: the mass of every map, its spatial spread (L_s) and the L1 distances between filter i and
filter (i + s) mod N_g of its group for each shift s (L_g). In eager PyTorch that is about 70 passes
over every activation value (forward and backward), which makes a CGL step on small networks cost
more than twice a plain one. These kernels compute psi block by block (one group of one image at a
time, which stays in cache), never store it, and recompute it in the backward: two passes over the
activation forward, two or three backward, and one gradient buffer whose memory is reused from step
to step (`GradientBuffer`).

`SoftMapStatistics.apply` is the autograd function; `receptive_field.SoftReceptiveField` chooses it
(CPU) or the eager reference (CUDA, or `kernel="eager"`), and the tests check both agree. Every
reduction is a per-(image, channel) partial summed in a fixed order, so results do not depend on the
number of threads.
"""
from __future__ import annotations

import math
import os
import weakref

import llvmlite.ir
import numba
import numpy as np
import torch
from numba import njit, prange
from numba.core import types
from numba.extending import intrinsic

if "NUMBA_THREADING_LAYER" not in os.environ:  # numba's OpenMP layer would share torch's OpenMP runtime and thread count
    numba.config.THREADING_LAYER = "workqueue"

# reassociation lets LLVM vectorise the reductions; no "nnan"/"ninf": inputs may be extreme
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
# "numpy": no zero-division checks, so loops vectorise. No on-disk cache (`cache=True`): measured here, kernels
# loaded from numba's cache gave other float results than the same kernels compiled in the process, so
# results depended on whether a cache existed; compiling in every process keeps them reproducible.
_KERNEL = dict(fastmath=_FASTMATH, error_model="numpy")
_INLINE = dict(fastmath=_FASTMATH, error_model="numpy", inline="always")
_FREE_BLOCK = 16  # channels per block outside the groups
_TINY = np.float32(np.finfo(np.float32).tiny)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)  # Cody-Waite split of ln 2
_LOG2E = np.float32(1.4426950408889634)


@intrinsic
def _times_pow2(typingctx, value, exponent):
    """value * 2**exponent for an integral float32 exponent in [-126, 127], 2**exponent built from its bits.

    In LLVM IR so every step stays 32-bit and vectorises (numba widens int32 arithmetic to int64).
    """
    def codegen(context, builder, signature, args):
        int32 = llvmlite.ir.IntType(32)
        bits = builder.shl(builder.add(builder.fptosi(args[1], int32), int32(127)), int32(23))
        return builder.fmul(args[0], builder.bitcast(bits, llvmlite.ir.FloatType()))
    return types.float32(types.float32, types.float32), codegen


@njit(**_INLINE)
def _sigmoid(z):
    """1 / (1 + exp(-z)) in float32 that LLVM can vectorise (numba's exp is a scalar call).

    exp(t) = 2**n exp(r), n = round(t / ln 2), r = t - n ln 2 in [-ln2/2, ln2/2], exp(r) by its degree-7
    Taylor polynomial (error < 1e-8); t is clamped to [-87, 87], the float32 range. Within 3e-7
    relative of float64.
    """
    t = min(max(-z, np.float32(-87.0)), np.float32(87.0))
    n = np.floor(t * _LOG2E + np.float32(0.5))
    r = t - n * _LN2_HIGH - n * _LN2_LOW
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return np.float32(1.0) / (np.float32(1.0) + _times_pow2(p, n))


@njit(**_INLINE)
def _fill_maps(image, k, p2, start, stop, maps):
    """maps[f] = psi of channel start + f of one image, for the channels [start, stop)."""
    for f in range(stop - start):
        kc = k[start + f]
        source = image[start + f]
        target = maps[f]
        for j in range(source.shape[0]):
            target[j] = _sigmoid(kc * source[j] + p2)


@njit(**_INLINE)
def _centre(row, ys, xs):
    """(mass, sum of psi * y, sum of psi * x) of one flattened map; ys, xs: every position's coordinates."""
    total = np.float32(0.0)
    moment_y = np.float32(0.0)
    moment_x = np.float32(0.0)
    for j in range(row.shape[0]):
        value = row[j]
        total += value
        moment_y += value * ys[j]
        moment_x += value * xs[j]
    return total, moment_y, moment_x


@njit(**_INLINE)
def _distance_sums(row, ys, xs, cy, cx):
    """sum_j psi_j d_j and sum_j psi_j (j - c) / d_j (y and x) of one flattened map, d_j = ||j - c||.

    The second is the direction in which moving the centre changes the spread (the backward needs it);
    a position with d_j = 0 contributes 0 (dy = dx = 0 there), the subgradient at the kink.
    """
    total = np.float32(0.0)
    pull_y = np.float32(0.0)
    pull_x = np.float32(0.0)
    for j in range(row.shape[0]):
        dy, dx = ys[j] - cy, xs[j] - cx
        value = row[j]
        square = dy * dy + dx * dx
        inverse = np.float32(1.0) / np.sqrt(max(square, _TINY))  # one reciprocal square root, no division
        total += value * square * inverse
        q = value * inverse
        pull_y += q * dy
        pull_x += q * dx
    return total, pull_y, pull_x


@njit(parallel=True, **_KERNEL)
def _channel_moments(activation):
    """Per-channel sum and sum of squares over images and positions, in float64 across images."""
    images, channels, _ = activation.shape
    sums = np.zeros(channels)
    squares = np.zeros(channels)
    for channel in prange(channels):
        for image in range(images):
            total = np.float32(0.0)
            square = np.float32(0.0)
            row = activation[image, channel]
            for j in range(row.shape[0]):
                total += row[j]
                square += row[j] * row[j]
            sums[channel] += total
            squares[channel] += square
    return sums, squares


def _blocks(channels: int, groups: int, size: int) -> np.ndarray:
    """(start, stop) of every channel block, shape (B, 2): the groups, then the free channels in chunks."""
    grouped = [(start, start + size) for start in range(0, groups * size, max(size, 1))]
    free = [(start, min(start + _FREE_BLOCK, channels)) for start in range(groups * size, channels, _FREE_BLOCK)]
    return np.asarray(grouped + free, dtype=np.int64).reshape(-1, 2)


@njit(parallel=True, **_KERNEL)
def _forward(activation, k, p2, blocks, groups, size, shifts, ys, xs, spatial_eps, with_spread, mass, centres, spread, l1):
    """mass, spread, l1 as in SoftMapStatistics; centres[n, c] = (cy, cx, pull_y, pull_x) for the backward."""
    images, _, positions = activation.shape
    for image in prange(images):
        maps = np.empty((max(size, _FREE_BLOCK), positions), np.float32)
        for block in range(blocks.shape[0]):
            start, stop = blocks[block, 0], blocks[block, 1]
            _fill_maps(activation[image], k, p2, start, stop, maps)
            for f in range(stop - start):
                total, moment_y, moment_x = _centre(maps[f], ys, xs)
                mass[image, start + f] = total
                if with_spread:
                    denominator = total + spatial_eps
                    cy, cx = moment_y / denominator, moment_x / denominator
                    total, pull_y, pull_x = _distance_sums(maps[f], ys, xs, cy, cx)
                    spread[image, start + f] = total / denominator
                    centres[image, start + f, 0], centres[image, start + f, 1] = cy, cx
                    centres[image, start + f, 2], centres[image, start + f, 3] = pull_y, pull_x
            if start < groups * size:
                group = start // size
                for f in range(size):
                    first = maps[f]
                    for s in range(shifts.shape[0]):
                        second = maps[(f + shifts[s]) % size]
                        total = np.float32(0.0)
                        for j in range(positions):
                            total += abs(first[j] - second[j])
                        l1[image, group, s, f] = total


@njit(parallel=True, **_KERNEL)
def _backward(activation, k, p2, blocks, groups, size, shifts, ys, xs, spatial_eps, with_spread, mass, centres, spread,
              grad_l1, grad_mass, grad_spread, out, dots, h_sums):
    """out = h k with h = dL/dpsi psi (1 - psi); dots[n, c] = sum_j h a, h_sums[n, c] = sum_j h."""
    images, _, positions = activation.shape
    for image in prange(images):
        maps = np.empty((max(size, _FREE_BLOCK), positions), np.float32)
        for block in range(blocks.shape[0]):
            start, stop = blocks[block, 0], blocks[block, 1]
            _fill_maps(activation[image], k, p2, start, stop, maps)
            grouped = start < groups * size
            for f in range(stop - start):
                channel = start + f
                row = maps[f]
                target = out[image, channel]
                base = grad_mass[image, channel]
                if with_spread:  # dL_s/dpsi_j = (d_j - L + <dL/dc, j - c>) / m, see eager_kernels.SpatialSpread
                    denominator = mass[image, channel] + spatial_eps
                    weight = grad_spread[image, channel] / denominator
                    cy, cx = centres[image, channel, 0], centres[image, channel, 1]
                    grad_cy, grad_cx = -centres[image, channel, 2] / denominator, -centres[image, channel, 3] / denominator
                    base -= spread[image, channel] * weight
                    for j in range(positions):
                        dy, dx = ys[j] - cy, xs[j] - cx
                        square = dy * dy + dx * dx
                        distance = square / np.sqrt(max(square, _TINY))
                        target[j] = base + weight * (distance + grad_cy * dy + grad_cx * dx)
                else:
                    target[:] = base
                if grouped:  # d|m_f - m_(f+s)| / dm_f and, as the partner of f - s, d|m_(f-s) - m_f| / dm_f
                    group = start // size
                    for s in range(shifts.shape[0]):
                        ahead, behind = (f + shifts[s]) % size, (f - shifts[s]) % size
                        weight_ahead, weight_behind = grad_l1[image, group, s, f], grad_l1[image, group, s, behind]
                        partner_ahead, partner_behind = maps[ahead], maps[behind]
                        for j in range(positions):
                            value, first, second = row[j], partner_ahead[j], partner_behind[j]
                            target[j] += (weight_ahead * (np.float32(value > first) - np.float32(value < first))
                                          - weight_behind * (np.float32(second > value) - np.float32(second < value)))
                kc = k[channel]
                source = activation[image, channel]
                dot = np.float32(0.0)
                h_sum = np.float32(0.0)
                for j in range(positions):
                    value = row[j]
                    h = target[j] * value * (np.float32(1.0) - value)
                    dot += h * source[j]
                    h_sum += h
                    target[j] = h * kc
                dots[image, channel] = dot
                h_sums[image, channel] = h_sum


@njit(parallel=True, **_KERNEL)
def _add_centred(out, activation, beta, mean):
    """out += beta_c (a - mean_c): the gradient through the per-channel std."""
    images, channels, positions = activation.shape
    for image in prange(images):
        for channel in range(channels):
            b, m = beta[channel], mean[channel]
            target, source = out[image, channel], activation[image, channel]
            for j in range(positions):
                target[j] += b * (source[j] - m)


class _Threads:
    """numba's thread count set to torch's for the duration (CPU time stays comparable)."""

    def __enter__(self):
        self.previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))

    def __exit__(self, *exc):
        numba.set_num_threads(self.previous)


class GradientBuffer:
    """Memory for one layer's activation gradient, lent to a step's backward and reused by the next.

    Memory over glibc's mmap threshold (32 MB) is mapped anew at every allocation and its pages are
    faulted in on first touch: for conv1 of the CGL benchmark's small CNN (67 MB) a fresh gradient
    made the fused backward take 74 ms instead of 42. `take` hands out a view of the kept memory when
    the previous view is gone (a weak reference tells: torch keeps the view alive while any tensor
    uses it) and fresh memory otherwise, so a gradient someone keeps is never overwritten.
    """

    _ALIGN = 16  # spare float32 values, enough to start every view on a 64-byte boundary

    def __init__(self):
        self._memory = np.empty(0, np.float32)
        self._lent = None

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        if self._memory.size < count + self._ALIGN or (self._lent is not None and self._lent() is not None):
            self._memory = np.empty(count + self._ALIGN, np.float32)
        offset = (-self._memory.ctypes.data % 64) // 4
        view = self._memory[offset: offset + count].reshape(shape)
        self._lent = weakref.ref(view)
        return view

    def __reduce__(self):  # scratch memory, not state: copies and pickles start empty
        return type(self), ()


class SoftMapStatistics(torch.autograd.Function):
    """(l1, mass, spread) of psi = sigmoid(k_c a + P2) for one layer, fused (CPU, float32).

    `activation` (N, C, H, W); `scale` (C,): k_c = scale_c / (std_c + std_eps) with `standardise`
    (std over batch and positions, the gradient flows through it) or k_c = scale_c; `p2` scalar tensor.
    The first `groups * size` channels form the groups; `shifts` (ints in 1..size-1) pair filter i with
    (i + s) mod size. `coordinates` (ys, xs) enable the spread with `spatial_eps` added to the mass;
    None skips it. `gradient_buffer` (a GradientBuffer, optional) holds the activation gradient's memory
    between steps. Returns l1 (N, G, len(shifts), size), mass (N, C) = sum of psi, spread (N, C) (or
    (N, 0) without coordinates). Equations: eager_kernels.StdSoftMap, GroupShiftL1, SpatialSpread.
    """

    @staticmethod
    def forward(ctx, activation, scale, p2, standardise, std_eps, groups, size, shifts, coordinates, spatial_eps,
                gradient_buffer=None):
        n, c, h, w = activation.shape
        flat = activation.detach().reshape(n, c, h * w).contiguous()
        values = flat.numpy()
        mean = std = None
        scale_values = scale.detach().double().numpy()
        with _Threads():
            if standardise:
                count = n * h * w
                sums, squares = _channel_moments(values)
                mean = sums / count
                std = np.sqrt(np.maximum((squares - count * mean**2) / max(count - 1, 1), 0.0))
                k = (scale_values / (std + std_eps)).astype(np.float32)
            else:
                k = scale_values.astype(np.float32)
            with_spread = coordinates is not None
            ys, xs = (coordinates if with_spread else (torch.zeros(h), torch.zeros(w)))  # every position's y and x:
            ys, xs = ys.float().repeat_interleave(w).numpy(), xs.float().repeat(h).numpy()  # flat loops vectorise on small maps
            shift_array = np.asarray(shifts, dtype=np.int64)
            mass, centres = np.empty((n, c), np.float32), np.empty((n, c, 4), np.float32)
            spread = np.empty((n, c if with_spread else 0), np.float32)
            l1 = np.empty((n, groups, len(shifts), size), np.float32)
            blocks = _blocks(c, groups, size)
            _forward(values, k, np.float32(p2.item()), blocks, groups, size, shift_array, ys, xs, np.float32(spatial_eps), with_spread,
                     mass, centres, spread, l1)
        ctx.save_for_backward(flat)
        ctx.state = (activation.shape, mean, std, k, np.float32(p2.item()), blocks, std_eps, groups, size, shift_array, ys, xs,
                     spatial_eps, with_spread, mass, centres, spread, gradient_buffer or GradientBuffer())
        return torch.from_numpy(l1), torch.from_numpy(mass), torch.from_numpy(spread)

    @staticmethod
    def backward(ctx, grad_l1, grad_mass, grad_spread):
        (flat,) = ctx.saved_tensors
        (shape, mean, std, k, p2, blocks, std_eps, groups, size, shifts, ys, xs, spatial_eps, with_spread, mass, centres, spread,
         gradient_buffer) = ctx.state
        n, c, positions = flat.shape

        def table(grad, shape):  # autograd passes None for an output that got no gradient
            return np.zeros(shape, np.float32) if grad is None else grad.float().contiguous().numpy()

        memory = gradient_buffer.take(tuple(shape))
        out = torch.from_numpy(memory)  # not a torch view: autograd can then add the network's gradient in place
        grad = memory.reshape(n, c, positions)
        dots, h_sums = np.empty((n, c), np.float32), np.empty((n, c), np.float32)
        values = flat.numpy()
        with _Threads():
            _backward(values, k, p2, blocks, groups, size, shifts, ys, xs,
                      np.float32(spatial_eps), with_spread, mass, centres, spread,
                      table(grad_l1, (n, groups, len(shifts), size)), table(grad_mass, mass.shape), table(grad_spread, spread.shape),
                      grad, dots, h_sums)
            dot = dots.astype(np.float64).sum(0)
            if std is not None:
                count = n * positions
                with np.errstate(divide="ignore", invalid="ignore"):
                    beta = np.where(std > 0, -dot * k / ((std + std_eps) * (count - 1) * std), 0.0)
                _add_centred(grad, values, beta.astype(np.float32), mean.astype(np.float32))
        grad_scale = torch.from_numpy(dot / (std + std_eps) if std is not None else dot).float()
        grad_p2 = torch.tensor(float(h_sums.astype(np.float64).sum()))
        return out, grad_scale, grad_p2, None, None, None, None, None, None, None, None
