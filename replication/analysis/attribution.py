"""White-box explainers from well-kept libraries behind one call: `explain(model, images, method)`.

Captum (pinned in pyproject) computes Grad-CAM on a conv layer (`anatomy_of(model).last_conv` by
default), Integrated Gradients and Guided Backprop; zennit computes LRP with its composites (default
epsilon-plus-flat: epsilon on dense layers, z-plus on convs, flat on the first layer) after its canonizers
merge each BatchNorm into its conv (`SequentialMergeBatchNorm`, and zennit's `ResNetCanonizer` for
torchvision ResNets). A module with an `lrp_linear()` context manager (LAP's `LAP2d`: its attention-weighted
pool) is made linear in its input while LRP runs and gets zennit's `Norm` rule, the rule zennit's composites
give average pools: R_p = w_p x_p / Σ w x · R with its weights as constants. None of them is re-implemented here. A method may also be a callable
`(model, images, target) -> maps` (how LAP's own maps join the comparison without this layer importing it).

Every method returns one map per image, N × H × W at the images' size, on the CPU:
- Grad-CAM: ReLU of the gradient-weighted channel sum, upsampled bilinearly (captum's `interpolate`);
- pixel methods (IG, Guided Backprop, LRP): the channels of the attribution reduced by `channel_reduce`
  ("abs_sum", captum's visualisation default, or "sum").
`target` None explains each image's predicted class.
"""
from __future__ import annotations

import inspect
import warnings
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from replication.data.broden import IMAGENET_MEAN, IMAGENET_STD
from replication.models.anatomy import anatomy_of
from replication.models.hooks import get_module
from replication.models.surgery import eval_mode, replace_module
from replication.runtime import resolve_device

METHODS = ("gradcam", "integrated_gradients", "guided_backprop", "lrp")
LRP_COMPOSITES = ("epsilon_plus_flat", "epsilon_alpha2_beta1_flat", "epsilon_plus", "epsilon_gamma_box")
CHANNEL_REDUCE = ("abs_sum", "sum")
Explainer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _reduce(attribution: torch.Tensor, rule: str) -> torch.Tensor:
    return attribution.abs().sum(1) if rule == "abs_sum" else attribution.sum(1)


def _gradcam(model, images, target, *, layer=None):
    from captum.attr import LayerAttribution, LayerGradCam
    module = get_module(model, layer or anatomy_of(model).last_conv)
    maps = LayerGradCam(model, module).attribute(images, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(maps, tuple(images.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def _integrated_gradients(model, images, target, *, batch_size, steps=32, channel_reduce="abs_sum"):
    from captum.attr import IntegratedGradients
    # captum runs the len(images) × steps interpolated images in forward passes of at most `batch_size` (at
    # least one step of every image), so memory is bounded like every other explainer's
    attribution = IntegratedGradients(model).attribute(images, baselines=torch.zeros_like(images), target=target,
                                                       n_steps=steps, internal_batch_size=max(batch_size, len(images)))
    return _reduce(attribution, channel_reduce)


UNGUIDED_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Softplus, nn.Tanh, nn.Sigmoid)


class _GuidedReLU6(nn.ReLU):
    """ReLU6 as an `nn.ReLU` subclass, so that captum's Guided Backprop (which hooks `nn.ReLU` modules only)
    applies its rule (pass positive gradients only) at ReLU6 too; the forward is ReLU6's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu6(x, inplace=self.inplace)


@contextmanager
def _relu6_guided(model: nn.Module) -> Iterator[None]:
    """Every `nn.ReLU6` of `model` replaced by `_GuidedReLU6` while active (restored after)."""
    swapped = [(name, module) for name, module in model.named_modules(remove_duplicate=False) if type(module) is nn.ReLU6]
    for name, module in swapped:
        replace_module(model, name, _GuidedReLU6(inplace=module.inplace))
    try:
        yield
    finally:
        for name, module in swapped:
            replace_module(model, name, module)


def _guided_backprop(model, images, target, *, channel_reduce="abs_sum"):
    from captum.attr import GuidedBackprop
    other = sorted({type(m).__name__ for m in model.modules() if isinstance(m, UNGUIDED_ACTIVATIONS)})
    if other:
        raise ValueError(f"guided_backprop: {type(model).__name__} has {other} activations, which captum's Guided "
                         "Backprop does not modify (it hooks ReLUs only): its map would be partly the plain gradient. "
                         "Use another explainer for this model.")
    with warnings.catch_warnings(), _relu6_guided(model):  # captum's notes that it sets requires_grad and hooks ReLUs (both intended)
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        attribution = GuidedBackprop(model).attribute(images, target=target)
    return _reduce(attribution, channel_reduce)


def lrp_canonizers(model: nn.Module) -> list:
    """zennit's canonizers for `model`: its ResNet canonizer for torchvision ResNets, BatchNorm merging always.
    A model with BatchNorm subclasses (timm's `BatchNormAct2d`) is refused: zennit merges only `BatchNorm2d`
    modules that follow a conv inside an `nn.Sequential`, so LRP would pass through those unmerged."""
    from torchvision.models import ResNet
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer
    unmerged = sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d})
    if unmerged:
        raise ValueError(f"lrp: zennit has no canonizer for {type(model).__name__}'s {unmerged} (BatchNorm with an "
                         "activation, not inside an nn.Sequential after its conv): LRP would pass relevance through "
                         "unmerged BatchNorms. Use another explainer for this model.")
    return [ResNetCanonizer()] if isinstance(model, ResNet) else [SequentialMergeBatchNorm()]


def pixel_bounds(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The lowest and highest possible input values per channel (1 × C × 1 × 1): pixels in [0, 1] after the
    ImageNet normalisation every dataset here applies (`data.broden.IMAGENET_MEAN` / `IMAGENET_STD`), for
    the z-box rule of `epsilon_gamma_box`; fixed, so a map does not depend on the other images of its batch."""
    if images.shape[1] != len(IMAGENET_MEAN):
        raise ValueError(f"epsilon_gamma_box needs {len(IMAGENET_MEAN)}-channel ImageNet-normalised images, "
                         f"got {images.shape[1]} channels.")
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return {"low": (0 - mean) / std, "high": (1 - mean) / std}


def _lrp(model, images, target, *, composite="epsilon_plus_flat", channel_reduce="abs_sum"):
    from zennit import composites
    from zennit.attribution import Gradient
    from zennit.rules import Norm
    names = {"epsilon_plus_flat": composites.EpsilonPlusFlat, "epsilon_alpha2_beta1_flat": composites.EpsilonAlpha2Beta1Flat,
             "epsilon_plus": composites.EpsilonPlus, "epsilon_gamma_box": composites.EpsilonGammaBox}
    if composite not in names:
        raise ValueError(f"LRP composite {composite!r} is not one of {LRP_COMPOSITES}.")
    keywords = pixel_bounds(images) if composite == "epsilon_gamma_box" else {}
    linearised = [module for module in model.modules() if callable(getattr(module, "lrp_linear", None))]
    layer_map = [(tuple({type(module) for module in linearised}), Norm())] if linearised else []
    rule = names[composite](canonizers=lrp_canonizers(model), layer_map=layer_map, **keywords)
    with ExitStack() as stack:
        for module in linearised:
            stack.enter_context(module.lrp_linear())
        with Gradient(model=model, composite=rule) as attributor:
            _, relevance = attributor(images, lambda logits: torch.nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype))
    return _reduce(relevance, channel_reduce)


_EXPLAINERS: dict[str, Callable] = {"gradcam": _gradcam, "integrated_gradients": _integrated_gradients,
                                    "guided_backprop": _guided_backprop, "lrp": _lrp}


def explain(model: nn.Module, images: torch.Tensor, method: str | Explainer, *, target: torch.Tensor | None = None,
            batch_size: int = 64, device: str | torch.device | None = None, **options) -> torch.Tensor:
    """Maps N × H × W (CPU, float32) of `method` for `images` (N × 3 × H × W), in batches of `batch_size`
    on `device` (IG's interpolated images too: at most `batch_size` per forward pass), with `model` in eval
    mode (its modes restored). `target`: class per image (None: the predicted class). `options`: `layer`
    (Grad-CAM), `steps` (IG), `composite` (LRP), `channel_reduce` (the pixel methods); any other option,
    or any option for a callable method, is refused."""
    if not callable(method) and method not in _EXPLAINERS:
        raise ValueError(f"unknown explainer {method!r}; choose one of {METHODS} or pass a callable (model, images, target).")
    accepted = set() if callable(method) else {
        name for name, p in inspect.signature(_EXPLAINERS[method]).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(options) - (accepted - {"batch_size"}))
    if unknown:
        takes = sorted(accepted - {"batch_size"}) or "no options"
        raise ValueError(f"explain: {method if isinstance(method, str) else 'a callable method'} takes {takes}, "
                         f"not {unknown}.")
    if images.ndim != 4:
        raise ValueError(f"explain needs images N x C x H x W, got shape {tuple(images.shape)}.")
    if options.get("channel_reduce", "abs_sum") not in CHANNEL_REDUCE:
        raise ValueError(f"channel_reduce {options['channel_reduce']!r} is not one of {CHANNEL_REDUCE}.")
    device = resolve_device(device)
    run = method if callable(method) else _EXPLAINERS[method]
    maps = []
    with eval_mode(model):
        model.to(device)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device)
            if target is None:
                with torch.no_grad():
                    chosen = model(batch).argmax(1)
            else:
                chosen = target[start:start + batch_size].to(device)
            sizes = {"batch_size": batch_size} if "batch_size" in accepted else {}
            out = run(model, batch, chosen, **options, **sizes) if not callable(method) else run(model, batch, chosen)
            maps.append(out.detach().float().cpu())
    return torch.cat(maps)
