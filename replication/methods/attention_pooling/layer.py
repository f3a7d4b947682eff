"""LAP, Local Attention Pooling (paper 02): the pooling layer, its insertion into a CNN and its maps.

Only the abstract of the paper is known (spec `shared/papers/02_local_attention_pooling.md`), so the
layer is the project's stated design (spec 3.3), every unknown a parameter:

- an attention block g (conv3×3 C -> C/`reduction`, BN, ReLU, conv1×1 -> `heads`) gives score maps S
  and the attention A = sigmoid(S) (B × heads × H × W);
- per pooling window R the weights w_p come from A with a learnable sharpness alpha = softplus(ρ):
  `gauss_max` (default) w_p ∝ exp(-alpha (max_R A - A_p)²), normalised over R; `softmax`
  w_p ∝ exp(alpha S_p); `tf_third_party` the unnormalised rule of a circulating Keras layer (spec 3.2),
  on the features, not on A;
- the output is Y_R = Σ_p w_p X_p; several heads either `split` the channels into groups (one head per
  group) or take the `mean` of the heads' weights for every channel;
- a window of None is global pooling (R = the whole map), which is what replaces the global average pool.

The attention block's last conv starts with small random weights, N(0, `init_std`²) drawn from torch's
global generator (seeded by the caller: `train_cached` seeds before it builds), and a zero bias. S is then
near 0, the `gauss_max` and `softmax` weights near uniform, so inserted in place of an average pool the layer
computes nearly what the trained network computed (exactly with `init_std` = 0). The weights must not be
exactly zero: with a uniform A every `gauss_max` logit -alpha (max_R A - A_p)² and its derivatives in A and
alpha are 0, a saddle where the task loss sends no gradient into the attention block or alpha, so a LAP
trained by cross-entropy alone would stay an average pool for ever. (`tf_third_party` weighs the features
themselves: it is not uniform at insertion and its attention block gets no gradient from the task.)
alpha -> 0 gives average pooling, alpha -> ∞ keeps the position of the largest attention (max pooling
when the attention is the feature itself).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from replication.models.anatomy import anatomy_of
from replication.models.hooks import get_module
from replication.models.surgery import eval_mode, replace_module
from replication.runtime import resolve_device

WEIGHT_MODES = ("gauss_max", "softmax", "tf_third_party")
INIT_STD = 1e-2  # SD of the attention block's last-conv weights at initialisation (see the module docstring)
HEAD_MODES = ("split", "mean")
COMBINE_RULES = ("prod", "mean", "last")
TF_EPS = 1e-7  # the Keras layer's eps inside the window sum


class AttentionBlock(nn.Sequential):
    """g: conv3×3 (C -> max(1, C // reduction)) + BN + ReLU + conv1×1 (-> heads): the score maps S.
    The last conv starts near zero, weights N(0, `init_std`²) from torch's global generator and bias 0
    (S ≈ 0: nearly uniform pooling weights, the inserted network nearly unchanged, yet off the saddle
    where the task loss gives the block no gradient; `init_std` = 0 puts it exactly on that saddle)."""

    def __init__(self, channels: int, heads: int = 1, reduction: int = 4, init_std: float = INIT_STD):
        if init_std < 0:
            raise ValueError(f"AttentionBlock: init_std = {init_std}; give a standard deviation >= 0.")
        hidden = max(1, channels // reduction)
        super().__init__(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU(), nn.Conv2d(hidden, heads, 1))
        nn.init.normal_(self[-1].weight, std=init_std)
        nn.init.zeros_(self[-1].bias)


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value)) if value < 30 else value


class LAP2d(nn.Module):
    """Local Attention Pooling over `kernel` × `kernel` windows (`stride`, zero `padding` positions
    weigh nothing), or over the whole map when `kernel` is None (global pooling; `flatten` returns
    B × C like timm's pool instead of B × C × 1 × 1). `attention` replaces the attention block (any
    module X -> B × heads × H × W scores; `nn.Identity()` with heads = C makes the features their own
    scores). `init_std`: the SD of the attention block's last-conv weights at initialisation (module
    docstring). After each forward `attention_map` holds A = sigmoid(S) and `pooling_weights` the window
    weights actually used, averaged over heads (or channels), both detached (losses hook the block); from
    them, on demand, `pooling_map` and `pooling_departure`.
    Inside `lrp_linear()` the window weights are constants (detached), so the layer is linear in its input
    and LRP's rule for pools (zennit's `Norm`, `analysis.attribution`) gives R_p = w_p X_p / Σ_q w_q X_q · R."""

    def __init__(self, channels: int, *, kernel: int | None = None, stride: int | None = None, padding: int = 0,
                 heads: int = 1, head_mode: str = "split", weight_mode: str = "gauss_max", alpha_init: float = 1.0,
                 reduction: int = 4, init_std: float = INIT_STD, flatten: bool = False,
                 attention: nn.Module | None = None):
        super().__init__()
        problems = []
        if weight_mode not in WEIGHT_MODES:
            problems.append(f"weight_mode {weight_mode!r} is not one of {WEIGHT_MODES}")
        if head_mode not in HEAD_MODES:
            problems.append(f"head_mode {head_mode!r} is not one of {HEAD_MODES}")
        if heads < 1 or (head_mode == "split" and channels % heads):
            problems.append(f"heads = {heads}: give >= 1 heads, dividing the {channels} channels under head_mode 'split'")
        if not alpha_init > 0:
            problems.append(f"alpha_init = {alpha_init}: the sharpness must start > 0")
        if kernel is not None and (kernel < 1 or padding < 0 or padding > kernel // 2):
            problems.append(f"kernel {kernel} / padding {padding}: need kernel >= 1 and 0 <= padding <= kernel // 2")
        if problems:
            raise ValueError("LAP2d: " + "; ".join(problems) + ".")
        self.channels, self.kernel, self.padding = channels, kernel, padding
        self.stride = stride if stride is not None else kernel
        self.heads, self.head_mode, self.weight_mode, self.flatten = heads, head_mode, weight_mode, flatten
        self.alpha_init = float(alpha_init)
        self.raw_alpha = nn.Parameter(torch.tensor(_inverse_softplus(self.alpha_init)))
        self.attention = attention if attention is not None else AttentionBlock(channels, heads, reduction, init_std)
        self.attention_map: torch.Tensor | None = None
        self.pooling_weights: torch.Tensor | None = None  # B × windows × positions, of the last forward
        self._pooled_size: tuple[int, int] | None = None  # the input's H × W in that forward
        self.constant_weights = False

    def reset_parameters(self) -> None:
        """The sharpness back to `alpha_init` (the attention block's layers reset themselves): what the
        parameter-randomisation check calls on every module it re-initialises."""
        with torch.no_grad():
            self.raw_alpha.fill_(_inverse_softplus(self.alpha_init))

    @contextmanager
    def lrp_linear(self) -> Iterator[None]:
        """While active, the window weights are detached from the features: the forward is then linear in X
        (what LRP's pool rule redistributes through), the gradient through the attention block is cut."""
        previous, self.constant_weights = self.constant_weights, True
        try:
            yield
        finally:
            self.constant_weights = previous

    @property
    def alpha(self) -> torch.Tensor:
        """The sharpness, softplus(ρ) > 0."""
        return F.softplus(self.raw_alpha)

    def extra_repr(self) -> str:
        window = "global" if self.kernel is None else f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"
        return f"{self.channels}, {window}, heads={self.heads} ({self.head_mode}), weights={self.weight_mode}"

    def _windows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """x (B × K × H × W) -> (B × K × L × P) windows, validity (1 × 1 × L × P) and the output grid."""
        b, k, h, w = x.shape
        if self.kernel is None:
            return x.reshape(b, k, 1, h * w), x.new_ones(1, 1, 1, h * w), (1, 1)
        args = dict(kernel_size=self.kernel, padding=self.padding, stride=self.stride)
        out = ((h + 2 * self.padding - self.kernel) // self.stride + 1, (w + 2 * self.padding - self.kernel) // self.stride + 1)
        windows = F.unfold(x, **args).view(b, k, self.kernel ** 2, -1).transpose(2, 3)
        valid = F.unfold(x.new_ones(1, 1, h, w), **args).view(1, 1, self.kernel ** 2, -1).transpose(2, 3)
        return windows, valid, out

    def _last_pooling(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        if self.pooling_weights is None:
            raise ValueError("this LAP layer has not pooled yet; run a forward pass first.")
        h, w = self._pooled_size
        _, valid, _ = self._windows(self.pooling_weights.new_ones(1, 1, h, w))
        return self.pooling_weights, valid, (h, w)

    @property
    def pooling_map(self) -> torch.Tensor:
        """B × H × W: the weight each input position got in the last pooling (summed where windows overlap)."""
        weights, _, size = self._last_pooling()
        if self.kernel is None:
            return weights.reshape(-1, *size)
        return F.fold(weights.transpose(1, 2), size, kernel_size=self.kernel, padding=self.padding, stride=self.stride)[:, 0]

    @property
    def pooling_departure(self) -> torch.Tensor:
        """B: each image's mean over windows of the total-variation distance of the last pooling's weights
        from average pooling over the window's real positions (0: the layer average-pooled; 1: all weight on
        one position)."""
        weights, valid, _ = self._last_pooling()
        normalised = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        uniform = valid[0, 0] / valid[0, 0].sum(-1, keepdim=True)
        return 0.5 * (normalised - uniform).abs().sum(-1).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.attention(x)  # B × heads × H × W (no shape check here: torch.fx traces this forward)
        attention = torch.sigmoid(scores)
        self.attention_map = attention.detach()
        features, valid, grid = self._windows(x)
        invalid = valid == 0
        if self.weight_mode == "tf_third_party":
            top = features.masked_fill(invalid, -math.inf).amax(-1, keepdim=True)
            weights = torch.exp(-self.alpha ** 2 * (top - features) ** 2).masked_fill(invalid, 0)
            weights = weights.detach() if self.constant_weights else weights
            pooled = ((weights * features + TF_EPS) * valid).sum(-1) / valid.sum(-1)
            self.pooling_weights = weights.detach().mean(1) / valid.sum(-1, keepdim=True)[:, 0]
        else:
            if self.weight_mode == "gauss_max":
                a, _, _ = self._windows(attention)
                top = a.masked_fill(invalid, -1.0).amax(-1, keepdim=True)
                logits = -self.alpha * (top - a) ** 2
            else:
                logits, _, _ = self._windows(self.alpha * scores)
            weights = torch.softmax(logits.masked_fill(invalid, -math.inf), dim=-1)  # B × heads × L × P
            weights = weights.detach() if self.constant_weights else weights
            if self.head_mode == "mean":
                pooled = (weights.mean(1, keepdim=True) * features).sum(-1)
            else:
                b, c, windows, positions = features.shape
                grouped = features.view(b, self.heads, c // self.heads, windows, positions)
                pooled = (weights.unsqueeze(2) * grouped).sum(-1).reshape(b, c, windows)
            self.pooling_weights = weights.detach().mean(1)
        self._pooled_size = x.shape[-2:]
        out = pooled.view(x.shape[0], x.shape[1], *grid)
        return out.flatten(1) if self.flatten else out


def lap_layers(model: nn.Module) -> dict[str, LAP2d]:
    """Every LAP layer of `model` by dotted name, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LAP2d)}


def _probe(model: nn.Module, name: str, size: int) -> tuple[int, tuple[int, ...]]:
    """The channel count of the feature map that reaches module `name` and the shape of its output without
    the batch (one entry: a pool that flattens), from one forward pass of a `size`-pixel image."""
    seen = {}

    def record(module, inputs, out):
        seen.setdefault("shape", (inputs[0].shape[1], tuple(out.shape[1:])))

    handle = get_module(model, name).register_forward_hook(record)
    try:
        parameter = next(model.parameters())
        with torch.no_grad():
            training = model.training
            model.eval()
            model(torch.zeros(1, 3, size, size, device=parameter.device, dtype=parameter.dtype))
            model.train(training)
    finally:
        handle.remove()
    return seen["shape"]


def _unsupported(name: str, old: nn.Module, out_shape: tuple[int, ...]) -> str | None:
    """Why LAP cannot stand in for the pool `old` (None when it can): a window pool with options LAP does
    not have, or a "global" pool that is not a global average (LAP starts as an average over the whole map)."""
    if isinstance(old, (nn.MaxPool2d, nn.AvgPool2d)):
        pairs = [old.kernel_size, old.stride, old.padding] + ([old.dilation] if isinstance(old, nn.MaxPool2d) else [])
        if any(not isinstance(v, int) and len(set(v)) > 1 for v in pairs):
            return f"{name} has a non-square kernel, stride or padding"
        if old.ceil_mode or (isinstance(old, nn.MaxPool2d) and old.dilation not in (1, (1, 1))):
            return f"{name} uses ceil_mode or dilation"
        if isinstance(old, nn.AvgPool2d) and old.padding not in (0, (0, 0)) and old.count_include_pad:
            return f"{name} counts padding in its average (LAP weighs padded positions 0)"
        return None
    if len(out_shape) > 1 and tuple(out_shape[1:]) != (1, 1):
        return f"{name} outputs a {tuple(out_shape[1:])} map, not 1x1 (a global LAP would change the classifier's input)"
    kind = getattr(old, "pool_type", "avg")
    if not isinstance(old, nn.AdaptiveAvgPool2d) and kind not in ("avg", "fast") or isinstance(old, nn.AdaptiveMaxPool2d):
        return f"{name} is a {type(old).__name__} ({kind}), not a global average pool"
    return None


def insert_lap(model: nn.Module, *, where: str | Sequence[str] = "global", heads: int = 1, head_mode: str = "split",
               weight_mode: str = "gauss_max", alpha_init: float = 1.0, reduction: int = 4,
               init_std: float = INIT_STD, image_size: int = 64) -> list[str]:
    """Replace pooling layers of a trained or fresh `model` by LAP layers, in place (`surgery.replace_module`),
    and return their names. `where`: "global" (the classifier's pool from `anatomy_of(model).pool`, as
    global LAP; timm's flattening pool keeps flattening), "local_pools" (every MaxPool2d and AvgPool2d, as
    windowed LAP with its kernel, stride and padding), or explicit module names. Initialised so that a replaced
    average pool computes nearly what it did (exactly with `init_std` = 0, padded positions aside; see the
    module docstring for why the default is not 0); a replaced max pool starts as a near-average over its
    window. `image_size`: of the probe image that finds each pool's channel count."""
    if isinstance(where, str) and where == "global":
        pool = anatomy_of(model).pool
        if pool is None:
            raise ValueError(f"{type(model).__name__} pools with a function (no pooling module to replace); "
                             "pass where='local_pools' or module names.")
        names = [pool]
    elif isinstance(where, str) and where == "local_pools":
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    elif isinstance(where, str):
        raise ValueError(f"insert_lap: where={where!r}; give 'global', 'local_pools' or a list of module names.")
    else:
        names = list(where)
    if not names:
        raise ValueError(f"insert_lap: {type(model).__name__} has no pooling layer for where={where!r}.")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for name in names:
        old = get_module(model, name)
        channels, out_shape = _probe(model, name, image_size)
        problem = _unsupported(name, old, out_shape)
        if problem:
            raise ValueError(f"insert_lap: {problem}; LAP replaces global average pools and square max/average "
                             "pools without ceil_mode or dilation. Pass other module names in `where`.")
        settings = dict(heads=heads, head_mode=head_mode, weight_mode=weight_mode, alpha_init=alpha_init, reduction=reduction,
                        init_std=init_std)
        if isinstance(old, (nn.MaxPool2d, nn.AvgPool2d)):
            kernel, stride, padding = (v if isinstance(v, int) else v[0] for v in (old.kernel_size, old.stride, old.padding))
            settings.update(kernel=kernel, stride=stride, padding=padding)
        else:
            settings.update(flatten=len(out_shape) == 1)
        replace_module(model, name, LAP2d(channels, **settings).to(device=device, dtype=dtype).train(old.training))
    return names


def layer_maps(model: nn.Module, *, head: str | int | torch.Tensor = "pooling") -> dict[str, torch.Tensor]:
    """Each LAP layer's map from the last forward pass as B × h × w: "pooling", the weights the layer pooled
    with (`LAP2d.pooling_map`: what the forward pass used); or its attention A: "mean" over heads, one head
    (int), or one head per image (`head` a B-vector, e.g. the predicted classes of class heads)."""
    maps = {}
    for name, layer in lap_layers(model).items():
        attention = layer.attention_map
        if attention is None:
            raise ValueError(f"LAP layer {name} has no attention map yet; run a forward pass first.")
        if isinstance(head, str):
            if head not in ("pooling", "mean"):
                raise ValueError(f"head={head!r}: give 'pooling', 'mean', a head index or one index per image.")
            maps[name] = layer.pooling_map if head == "pooling" else attention.mean(1)
        elif isinstance(head, int):
            maps[name] = attention[:, head]
        else:
            maps[name] = attention[torch.arange(len(attention), device=attention.device), head.to(attention.device)]
    return maps


def combine_maps(maps: Sequence[torch.Tensor], size: tuple[int, int], rule: str = "prod") -> torch.Tensor:
    """One interpretation map (B × H × W at `size`) from per-layer maps: each upsampled bilinearly, then
    their product ("in-depth", coarse-to-fine gating), mean, or the last layer's alone."""
    if rule not in COMBINE_RULES:
        raise ValueError(f"combine rule {rule!r} is not one of {COMBINE_RULES}.")
    if not maps:
        raise ValueError("combine_maps: no maps (the model has no LAP layer).")
    up = [F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0] for m in maps]
    if rule == "last":
        return up[-1]
    stacked = torch.stack(up)
    return stacked.prod(0) if rule == "prod" else stacked.mean(0)


def interpretation_map(model: nn.Module, images: torch.Tensor, *, combine: str = "prod",
                       head: str | torch.Tensor = "pooling") -> tuple[torch.Tensor, torch.Tensor]:
    """LAP's own explanation: one forward pass of `model` (its mode unchanged, no gradients) -> (maps
    B × H × W at the images' size, logits). `head` "pooling" reads the weights each layer pooled with,
    "class" each image's predicted-class head of the attention (class-specific heads), "mean" the mean
    attention over heads, or a B-vector of head indices."""
    with torch.no_grad():
        logits = model(images)
        chosen = logits.argmax(1) if isinstance(head, str) and head == "class" else head
        maps = layer_maps(model, head=chosen)
    return combine_maps(list(maps.values()), tuple(images.shape[-2:]), combine), logits


def pooling_departure(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """Per image, how far `model`'s LAP layers pool from average pooling: the mean over layers of
    `LAP2d.pooling_departure` (0: every layer average-pools; 1: all weight on one position per window).
    Forward passes in eval mode (the model's mode restored) in batches of `batch_size` on `device`
    (`runtime.resolve_device`), no gradients."""
    layers = list(lap_layers(model).values())
    if not layers:
        raise ValueError(f"pooling_departure: {type(model).__name__} has no LAP layer.")
    target = resolve_device(device)
    model.to(target)
    values = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(target))
            values.append(torch.stack([layer.pooling_departure for layer in layers]).mean(0).cpu())
    return torch.cat(values)
