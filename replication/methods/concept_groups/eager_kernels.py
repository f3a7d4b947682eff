"""The eager PyTorch autograd functions behind psi, L_g and L_s, each with an analytic backward.

They run on any device and are the reference the fused CPU kernels (`soft_map_kernels`) are tested
against; autograd's own backward would store several N x C x H x W tensors per layer and step.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class StdSoftMap(torch.autograd.Function):
    """psi = sigmoid(P1 * a / (s + eps) + P2), s = per-channel std over (N, H, W), fused.

    Backward (h = dL/dpsi * psi (1 - psi), k = P1 / (s + eps), n = N*H*W):
    dL/da = h k + beta (a - mean), beta = -(sum h a) k / ((s + eps) (n - 1) s) per channel (0 when
    s = 0); dL/dP1 = sum_c (sum h a)_c / (s_c + eps); dL/dP2 = sum h.
    """

    @staticmethod
    def forward(ctx, activation: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, eps: float) -> torch.Tensor:
        # two reductions without temporaries (var_mean is several times slower on CPU); combining them
        # in float64 limits the cancellation in sum(a^2) - n mean^2
        count = activation.numel() // activation.shape[1]
        dims = (0, 2, 3)
        mean = activation.sum(dims, keepdim=True).double() / count
        square = torch.linalg.vector_norm(activation, dim=dims, keepdim=True).double().square_()
        std = ((square - count * mean.square()) / max(count - 1, 1)).clamp_min_(0).sqrt_().to(activation.dtype)
        mean = mean.to(activation.dtype)
        k = p1 / (std + eps)
        psi = torch.addcmul(p2, activation, k).sigmoid_()
        ctx.save_for_backward(activation, psi, mean, std, k)
        ctx.eps = eps
        return psi

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        activation, psi, mean, std, k = ctx.saved_tensors
        n, c = activation.shape[0], activation.shape[1]
        h = torch.ops.aten.sigmoid_backward(grad, psi)
        grad_p2 = h.sum() if ctx.needs_input_grad[2] else None
        dot = (h.reshape(n * c, 1, -1) @ activation.reshape(n * c, -1, 1)).view(n, c).sum(0).view_as(k)
        count = activation.numel() // c
        beta = torch.where(std > 0, -dot * k / ((std + ctx.eps) * (count - 1) * std), torch.zeros_like(std))
        grad_a = h.mul_(k).addcmul_(activation, beta).sub_(beta * mean)
        grad_p1 = (dot / (std + ctx.eps)).sum() if ctx.needs_input_grad[1] else None
        return grad_a, grad_p1, grad_p2, None


@contextlib.contextmanager
def unfilled_buffers() -> Iterator[None]:
    """Let `torch.empty*` skip the NaN fill of deterministic mode (the training loop turns it on).

    Only for buffers the caller overwrites completely: filling them would be a wasted pass over
    memory, and it cannot change a result.
    """
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous


class GroupShiftL1(torch.autograd.Function):
    """Per-group L1 distances between filter i and filter (i + s) mod N_g for each shift s, and masses.

    flat: (N, C, P) soft maps; the first G*N_g channels form the groups. Returns l1 (N, G, k, N_g) and
    mass (N, G, N_g) = sum over P. Fused forward and backward without gather/scatter (both slow, and
    deterministic scatter-add on CPU slower still): the forward keeps sign(m_i - m_j) per shift, the
    backward accumulates it in place, once for m_i and once, shifted, for m_j.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, groups: int, size: int, shifts: tuple[int, ...]):
        maps = flat[:, : groups * size].reshape(flat.shape[0], groups, size, flat.shape[2])
        l1, signs = [], []
        for s in shifts:
            with unfilled_buffers():
                diff = torch.empty_like(maps)
            torch.sub(maps[:, :, : size - s], maps[:, :, s:], out=diff[:, :, : size - s])
            torch.sub(maps[:, :, size - s :], maps[:, :, :s], out=diff[:, :, size - s :])
            l1.append(torch.linalg.vector_norm(diff, 1, dim=-1))
            signs.append(diff.sign_())
        ctx.save_for_backward(*signs)
        ctx.shape, ctx.shifts = flat.shape, shifts
        return torch.stack(l1, dim=2), maps.sum(-1)

    @staticmethod
    def backward(ctx, grad_l1: torch.Tensor, grad_mass: torch.Tensor):
        n, g, size, p = ctx.saved_tensors[0].shape
        with unfilled_buffers():
            grad = grad_l1.new_empty(ctx.shape)
        grad[:, g * size :].zero_()  # free filters
        grouped = grad[:, : g * size].view(n, g, size, p)
        grouped.copy_(grad_mass[..., None].expand_as(grouped))
        for k, (s, sign) in enumerate(zip(ctx.shifts, ctx.saved_tensors)):
            weight = grad_l1[:, :, k, :, None]
            grouped.addcmul_(sign, weight)  # d|m_i - m_j| / d m_i
            grouped[:, :, s:].addcmul_(sign[:, :, : size - s], weight[:, :, : size - s], value=-1)  # m_j, j = i + s
            grouped[:, :, :s].addcmul_(sign[:, :, size - s :], weight[:, :, size - s :], value=-1)
        return grad, None, None, None


class SpatialSpread(torch.autograd.Function):
    """Fused L_s per map with an analytic backward (autograd's would store several N x C x H x W tensors).

    With mass m = sum psi + eps, centre c = sum j psi_j / m, d_j = ||j - c|| and L = sum psi_j d_j / m:
    dL/dpsi_j = (d_j - L + <dL/dc, j - c>) / m, where dL/dc = -sum_k psi_k (k - c) / d_k / m
    (a position with d_k = 0 contributes 0, the subgradient at the kink).
    """

    @staticmethod
    def forward(ctx, psi: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, eps: float) -> torch.Tensor:
        rows, cols = psi.sum(3), psi.sum(2)  # (N, C, H), (N, C, W)
        mass = rows.sum(2) + eps
        dy = ys - ((rows * ys).sum(2) / mass)[..., None]
        dx = xs - ((cols * xs).sum(2) / mass)[..., None]
        distance = (dy.square()[..., :, None] + dx.square()[..., None, :]).sqrt_()
        spread = (psi.flatten(2)[..., None, :] @ distance.flatten(2)[..., :, None]).view_as(mass) / mass
        ctx.save_for_backward(psi, distance, dy, dx, mass, spread)
        return spread

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        psi, distance, dy, dx, mass, spread = ctx.saved_tensors
        buffer = distance.clamp_min(torch.finfo(distance.dtype).tiny)  # the only full-size temporary
        weight = torch.div(psi, buffer, out=buffer)  # times dy = dx = 0 where d = 0
        grad_cy = -(weight.sum(3) * dy).sum(2) / mass
        grad_cx = -(weight.sum(2) * dx).sum(2) / mass
        row_term = (grad_cy[..., None] * dy - spread[..., None])[..., :, None]
        col_term = (grad_cx[..., None] * dx)[..., None, :]
        grad_psi = torch.add(distance, row_term, out=buffer).add_(col_term).mul_((grad / mass)[..., None, None])
        return grad_psi, None, None, None


def map_coordinates(height: int, width: int, like: torch.Tensor, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates of a map: raw indices [C] or scaled to [0, 1] [I]."""
    ys = torch.arange(height, dtype=like.dtype, device=like.device)
    xs = torch.arange(width, dtype=like.dtype, device=like.device)
    return (ys / max(height - 1, 1), xs / max(width - 1, 1)) if normalise else (ys, xs)
