"""torchvision backbones sized for small images, and weight loading from local files.

`build_backbone` returns torchvision's own module classes, so dotted layer names ("layer4",
"features.28", "features.denseblock4") are exactly torchvision's, also for the small-input and
width-scaled variants: removed stages become `nn.Identity` at the same index instead of being
dropped. Nothing is ever downloaded (`weights=None` always); pretrained weights come from a local
file through `load_weights`.

Last convolutional stage (`anatomy.anatomy_of(model).last_conv`) and its spatial size:

| arch        | layer                  | 224 px, small_input=False | 64 px, small_input=True |
|-------------|------------------------|---------------------------|-------------------------|
| resnet18/50 | layer4                 | 7×7                       | 8×8                     |
| vgg16       | features.28 (conv5_3)  | 14×14                     | 8×8                     |
| vgg16_bn    | features.40 (conv5_3)  | 14×14                     | 8×8                     |
| alexnet     | features.10 (conv5)    | 13×13                     | 7×7                     |
| alexnet_bn  | features.14 (conv5)    | 13×13                     | 7×7                     |
| densenet121 | features.denseblock4   | 7×7                       | 8×8 (4×4 keep_stem_pool)|

`small_input=True` (replication decision, for 64-px ConceptWorld images):
- ResNet / DenseNet: the 7×7 stride-2 stem conv becomes 3×3 stride 1 and the stem max-pool an
  `nn.Identity` (overall stride 32 -> 8);
- VGG16: the first max-pool (`features.4`, or `features.6` with BN) becomes `nn.Identity`
  (stride 32 -> 16 at pool5, conv5 at stride 8), and `avgpool` pools to 1×1 so the classifier's
  first layer has C5 inputs instead of C5·7·7 duplicated values;
- AlexNet: the 11×11 stride-4 conv1 becomes 5×5 stride 2 (pools unchanged), `avgpool` pools to 1×1.
`keep_stem_pool=True` (ResNet / DenseNet with `small_input`) keeps the stem max-pool (overall stride 16):
a quarter of the positions in every stage, for networks too slow at stride 8 on a CPU (DenseNet-121:
65 -> 14 s per epoch of 3,200 64-px images at width 0.125 on 2 cores).
`width` scales every convolution's channel count (and VGG/AlexNet's hidden classifier width, DenseNet's
growth rate and stem width) by the same factor, rounded to the nearest integer (at least 1).

All `nn.ReLU` modules are made non-inplace, so a hook on a convolution (or BN) sees its true
pre-activation output, which the CGL losses need; the arithmetic is unchanged. The `*_bn` variants are
VGG16 / AlexNet with BatchNorm after every convolution (CGL's AlexNet-B).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import VGG, make_layers

from replication import io
from replication.models.pretrained import PRETRAINED, pretrained_for_task

ARCHS = ("resnet18", "resnet50", "vgg16", "vgg16_bn", "alexnet", "alexnet_bn", "densenet121")

_RESNET_BLOCKS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}
_RESNET_PLANES = (64, 128, 256, 512)
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
_CLASSIFIER_HIDDEN = 4096  # VGG / AlexNet fully connected width
_DENSENET121 = {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64}


@dataclass(frozen=True)
class BackboneConfig:
    """What `build_backbone` needs besides the class count, plus an optional local weights file.

    An `arch` of `pretrained.PRETRAINED` (EfficientNet-Lite0) builds that ImageNet-trained network with
    a fresh head (`pretrained_for_task`), to fine-tune: `weights` then replaces its packaged ImageNet
    file, and `small_input`, `width` and `keep_stem_pool` do not apply.
    """

    arch: str = "resnet18"
    small_input: bool = False
    width: float = 1.0
    weights: str | None = None
    keep_stem_pool: bool = field(default=False, metadata={"cache_key": "if_set"})

    def build(self, num_classes: int) -> nn.Module:
        if self.arch in PRETRAINED:
            if self.width != 1.0 or self.keep_stem_pool:
                raise ValueError(f"{self.arch} is a pretrained network: width and keep_stem_pool do not apply "
                                 f"(got width={self.width}, keep_stem_pool={self.keep_stem_pool}).")
            return pretrained_for_task(self.arch, num_classes, weights=self.weights)
        model = build_backbone(self.arch, num_classes, small_input=self.small_input, width=self.width,
                               keep_stem_pool=self.keep_stem_pool)
        if self.weights:
            load_weights(model, self.weights)
        return model


def build_backbone(arch: str, num_classes: int, *, small_input: bool = False, width: float = 1.0,
                   keep_stem_pool: bool = False) -> nn.Module:
    """A randomly initialised torchvision `arch` with `num_classes` outputs (never downloads weights).

    `small_input` removes the early downsampling (see the module docstring) so that 64-px images keep
    at least 7×7 positions in the last conv stage, except the stem max-pool of a ResNet or DenseNet when
    `keep_stem_pool`; `width` multiplies every channel count.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not width > 0:
        raise ValueError(f"width must be > 0 (1.0 = torchvision's channel counts), got {width!r}.")
    if keep_stem_pool and not (small_input and (arch in _RESNET_BLOCKS or arch == "densenet121")):
        raise ValueError(f"keep_stem_pool keeps the stem max-pool that small_input removes from a ResNet or DenseNet; "
                         f"it does not apply to arch {arch!r} with small_input={small_input}.")
    if arch in _RESNET_BLOCKS:
        model = _resnet(arch, num_classes, small_input, width, keep_stem_pool)
    elif arch.startswith("vgg16"):
        model = _vgg16(num_classes, small_input, width, batch_norm=arch.endswith("_bn"))
    elif arch.startswith("alexnet"):
        model = _alexnet(num_classes, small_input, width, batch_norm=arch.endswith("_bn"))
    else:
        model = _densenet121(num_classes, small_input, width, keep_stem_pool)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _skeleton(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a torchvision module on the meta device: its module tree and names, at no memory or
    init cost. Every module holding parameters must then be replaced (checked by `_check_materialised`)."""
    with torch.device("meta"):
        return factory()


def _check_materialised(model: nn.Module) -> nn.Module:
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"internal error: backbone tensors left on the meta device: {leftover[:5]}")
    return model


def _init_convs(model: nn.Module, *, mode: str, linear_std: float | None = None) -> None:
    """torchvision's initialisation scheme for its CNNs: Kaiming-normal convs (zero bias), BN at (1, 0),
    and for VGG Linear weights N(0, linear_std) with zero bias."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)


def _resnet(arch: str, num_classes: int, small_input: bool, width: float, keep_stem_pool: bool) -> nn.Module:
    block, depths = _RESNET_BLOCKS[arch]
    if width == 1.0 and not small_input:
        return getattr(tvm, arch)(weights=None, num_classes=num_classes)
    model = _skeleton(lambda: ResNet(block, list(depths), num_classes=num_classes))
    planes = [_scaled(p, width) for p in _RESNET_PLANES]
    if small_input:
        model.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
        if not keep_stem_pool:
            model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(planes[0])
    model.inplanes = planes[0]  # read by torchvision's `_make_layer` as the next block's input width
    for index, (plane, depth) in enumerate(zip(planes, depths)):
        setattr(model, f"layer{index + 1}", model._make_layer(block, plane, depth, stride=1 if index == 0 else 2))
    model.fc = nn.Linear(planes[-1] * block.expansion, num_classes)
    _init_convs(model, mode="fan_out")
    return _check_materialised(model)


def _vgg16(num_classes: int, small_input: bool, width: float, *, batch_norm: bool) -> nn.Module:
    if width == 1.0 and not small_input:
        return (tvm.vgg16_bn if batch_norm else tvm.vgg16)(weights=None, num_classes=num_classes)
    cfg = [c if c == "M" else _scaled(c, width) for c in _VGG16_CFG]
    model = _skeleton(lambda: VGG(nn.Sequential(), num_classes=num_classes, init_weights=False))
    model.features = make_layers(cfg, batch_norm=batch_norm)
    if small_input:
        first_pool = next(i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d))
        model.features[first_pool] = nn.Identity()
    pooled = 1 if small_input else 7
    model.avgpool = nn.AdaptiveAvgPool2d((pooled, pooled))
    model.classifier = _classifier(cfg[-2] * pooled * pooled, _scaled(_CLASSIFIER_HIDDEN, width), num_classes, vgg_order=True)
    _init_convs(model, mode="fan_out", linear_std=0.01)
    return _check_materialised(model)


def _classifier(in_features: int, hidden: int, num_classes: int, *, vgg_order: bool) -> nn.Sequential:
    """torchvision's VGG (Linear, ReLU, Dropout ×2, Linear) or AlexNet (Dropout, Linear, ReLU ×2,
    Linear) head with a chosen hidden width; the module indices match torchvision's."""
    layers: list[nn.Module] = []
    for fan_in in (in_features, hidden):
        pair = [nn.Linear(fan_in, hidden), nn.ReLU()]
        layers += [*pair, nn.Dropout(0.5)] if vgg_order else [nn.Dropout(0.5), *pair]
    return nn.Sequential(*layers, nn.Linear(hidden, num_classes))


def _alexnet(num_classes: int, small_input: bool, width: float, *, batch_norm: bool) -> nn.Module:
    if width == 1.0 and not small_input and not batch_norm:
        return tvm.alexnet(weights=None, num_classes=num_classes)
    channels = [_scaled(c, width) for c in _ALEXNET_CHANNELS]
    stem = dict(kernel_size=5, stride=2, padding=2) if small_input else dict(kernel_size=11, stride=4, padding=2)
    convs = [
        nn.Conv2d(3, channels[0], **stem),
        nn.Conv2d(channels[0], channels[1], kernel_size=5, padding=2),
        *(nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in zip(channels[1:], channels[2:])),
    ]
    layers: list[nn.Module] = []
    for index, conv in enumerate(convs):
        layers += [conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]
        if index in (0, 1, 4):  # max-pools after conv1, conv2 and conv5, as in torchvision
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
    model = _skeleton(lambda: tvm.AlexNet(num_classes=num_classes))
    model.features = nn.Sequential(*layers)
    pooled = 1 if small_input else 6
    model.avgpool = nn.AdaptiveAvgPool2d((pooled, pooled))
    model.classifier = _classifier(channels[-1] * pooled * pooled, _scaled(_CLASSIFIER_HIDDEN, width), num_classes, vgg_order=False)
    return _check_materialised(model)  # fresh modules carry PyTorch's default init, as torchvision's AlexNet


def _densenet121(num_classes: int, small_input: bool, width: float, keep_stem_pool: bool) -> nn.Module:
    if width == 1.0 and not small_input:
        return tvm.densenet121(weights=None, num_classes=num_classes)
    model = DenseNet(
        growth_rate=_scaled(_DENSENET121["growth_rate"], width),
        block_config=_DENSENET121["block_config"],
        num_init_features=_scaled(_DENSENET121["num_init_features"], width),
        num_classes=num_classes,
    )
    if small_input:
        stem_width = model.features.conv0.out_channels
        model.features.conv0 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.features.conv0.weight)  # DenseNet's own scheme (fan_in)
        if not keep_stem_pool:
            model.features.pool0 = nn.Identity()
    return model


# ----------------------------------------------------------------------------------------------
# Weights from local files
# ----------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("state_dict", "model_state_dict")
# Old torchvision / CSAIL DenseNet checkpoints name dense-layer modules "norm.1" where torchvision
# now has "norm1" (same for relu, conv).
_LEGACY_DENSENET_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")
_LISTED = 8  # keys shown per category in error messages


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint into `model` by parameter name; return `model`.

    Accepts torchvision files (a bare state dict) and CSAIL Places365 / training checkpoints
    (`{"state_dict": ...}` wrappers, `module.` prefixes from DataParallel, legacy DenseNet names).
    Loading uses `weights_only=True`. Missing, unexpected or mis-shaped keys raise one error that
    lists them; BatchNorm `num_batches_tracked` counters absent from pre-2018 files are tolerated.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"weights path {str(path)!r} is a directory; point to the checkpoint file itself.")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; point to a local checkpoint (nothing is downloaded).")
    payload = io.load_torch(path)  # unreadable or code-running files: one ValueError naming the fix
    state = _unwrap_state_dict(payload, path)
    state = _normalise_keys(state, model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape) and not _growing(model, k)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{label} ({len(keys)}): {', '.join(keys[:_LISTED])}{', ...' if len(keys) > _LISTED else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        ]
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__}: {'; '.join(parts)}. "
            f"Build the model with the checkpoint's arch, num_classes, small_input and width."
        )
    # num_batches_tracked may be absent from old files: keep the model's own counters for those.
    model.load_state_dict({**expected, **state}, strict=True)
    return model


def _growing(model: nn.Module, key: str) -> bool:
    """Whether `key` is a buffer its module declares as growing (in `growing_buffers`, e.g. a concept
    whitening layer's update trace), whose saved length the module takes when loading."""
    module_name, _, buffer = key.rpartition(".")
    return buffer in getattr(model.get_submodule(module_name), "growing_buffers", ())


def _unwrap_state_dict(payload: Any, path: Path) -> Mapping[str, torch.Tensor]:
    while isinstance(payload, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(payload.get(k), Mapping)), None)
        if wrapper is None:
            break
        payload = payload[wrapper]
    if not isinstance(payload, Mapping) or not all(torch.is_tensor(v) for v in payload.values()):
        found = sorted(map(str, payload))[:_LISTED] if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(f"{path} holds no state dict of tensors (found {found}); expected a torchvision or Places365 checkpoint.")
    return payload


def _normalise_keys(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Strip DataParallel's `module.` prefix and rename legacy DenseNet keys."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if isinstance(model, DenseNet):
        state = {_LEGACY_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    return dict(state)
