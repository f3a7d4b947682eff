"""What the papers name inside a CNN, read from the built model: one place for per-architecture layer knowledge.

`anatomy_of(model)` reads a torchvision-style network's named layers from its module tree:

| field        | plain (VGG, AlexNet)              | residual (ResNet)           | dense (DenseNet)                      | nas (timm EfficientNet)          |
|--------------|-----------------------------------|-----------------------------|---------------------------------------|----------------------------------|
| `convs`      | VGG conv1_1..conv5_3, AlexNet conv1..conv5 | every conv, by module name | every conv, by module name      | every conv, by module name       |
| `batchnorms` | conv -> its BN (the `_bn` variants) | conv -> its BN            | conv0 -> norm0, each layer's conv1 -> norm2 | conv -> its BN+activation (`conv_stem` -> `bn1`, `conv_head` -> `bn2`, in blocks `conv_dw`/`conv_pw`/`conv_pwl` -> `bn1..3`) |
| `stem`       | None                              | `maxpool`                   | `features.pool0`                      | `bn1`                            |
| `blocks`     | ()                                | `layer1.0` .. `layer4.1`    | dense blocks and transitions in order | `blocks.0.0` .. `blocks.6.0` (MBConv blocks) |
| `stages`     | ()                                | `layer1` .. `layer4`        | `features.denseblock1` .. `4`         | `blocks.0` .. `blocks.6`         |
| `features`   | `features.<last>` (pool5)         | `layer4`                    | `features.norm5` (a functional ReLU follows) | `bn2` (`conv_head`'s BN + ReLU6) |
| `last_conv`  | the last conv (VGG16 conv5_3: `features.28`) | `layer4`         | `features.denseblock4`                | `bn2`                            |
| `pool`       | `avgpool` (adaptive, to 7x7 / 6x6; 1x1 with small_input) | `avgpool` | None (pooled by a function)     | `global_pool` (pools and flattens) |

The connection family is read from the structure (`connection_family`), so any torchvision VGG, AlexNet,
ResNet or DenseNet, small-input and width-scaled variants included, and any timm EfficientNet (the blocks
of a NAS-found network: EfficientNet-B*, -Lite*, their `tf_` ports) is read the same way; one reader per
family sits in a small registry (`register`). Dotted names are `named_modules()` names, valid for
`hooks.get_module`, `capture_activations` and `surgery.replace_module`.

`batchnorms` pairs a conv with the BatchNorm that normalises its output and nothing else, found in the
torch.fx graph: a DenseNet layer's input BatchNorm normalises a concatenation, so it pairs with no conv.
timm's BatchNorm modules (`BatchNormAct2d`) apply the activation as well: a hook on one sees the activated
output, and a module put in its place must apply that activation too.
Model-agnostic queries (any `nn.Module`): `conv_layers`, `producing_conv`, `batchnorm_pairs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx
from torch import nn
from torchvision.models.vgg import VGG

from replication.models.hooks import get_module

# The connection family of each `backbones.ARCHS` entry, for questions asked before a model is built.
FAMILY_OF_ARCH = {"vgg16": "plain", "vgg16_bn": "plain", "alexnet": "plain", "alexnet_bn": "plain",
                  "resnet18": "residual", "resnet50": "residual", "densenet121": "dense"}
# The connection family of each `pretrained.PRETRAINED` network (not backbones), likewise by name.
FAMILY_OF_PRETRAINED = {"efficientnet_lite0": "nas"}
_POOLS = (nn.MaxPool2d, nn.Identity)  # a VGG block ends in a max-pool (an Identity where small_input removed it)


@dataclass(frozen=True)
class Anatomy:
    """The named layers of one network (see the module docstring's table); all values are module names.

    `convs`: the papers' conv names -> module names, in forward order. `batchnorms`: conv module -> the
    BatchNorm that normalises its output alone. `stem`: the stem's output (None for plain networks).
    `blocks` / `stages`: the outputs of the repeated units and of the stages that group them.
    `features`: the module giving the last spatial feature map (before global pooling). `last_conv`: the
    last conv stage, the layer Network Dissection reads by default. `pool`: the module that pools the
    feature map for the classifier (None where the forward pools with a function).
    """

    family: str
    convs: dict[str, str]
    batchnorms: dict[str, str]
    stem: str | None
    blocks: tuple[str, ...]
    stages: tuple[str, ...]
    features: str
    last_conv: str
    pool: str | None

    def conv(self, name: str) -> str:
        """The module name of the conv the papers call `name` (e.g. VGG16's "conv5_3" -> "features.28")."""
        if name not in self.convs:
            raise ValueError(f"no conv called {name!r} in this {self.family} network; known: {', '.join(self.convs)}")
        return self.convs[name]


_READERS: dict[str, Callable[[nn.Module], Anatomy]] = {}


def register(family: str) -> Callable[[Callable[[nn.Module], Anatomy]], Callable[[nn.Module], Anatomy]]:
    """Decorator: make `reader(model) -> Anatomy` the reader of the networks of `family`."""
    def add(reader: Callable[[nn.Module], Anatomy]) -> Callable[[nn.Module], Anatomy]:
        _READERS[family] = reader
        return reader

    return add


def connection_family(model: nn.Module) -> str:
    """'plain', 'residual', 'dense' (torchvision) or 'nas' (timm EfficientNet), read from the module structure."""
    names = {name for name, _ in model.named_modules()}
    if {"conv_stem", "blocks", "conv_head", "global_pool"} <= {name for name, _ in model.named_children()}:
        return "nas"
    if "features.denseblock1" in names:
        return "dense"
    if {"layer1", "layer4"} <= names:
        return "residual"
    if "features" in names and isinstance(get_module(model, "features"), nn.Sequential):
        return "plain"
    raise ValueError(f"cannot read the layers of {type(model).__name__}: expected a torchvision VGG/AlexNet "
                     "(features Sequential), ResNet (layer1..layer4) or DenseNet (features.denseblockN), or a timm "
                     "EfficientNet (conv_stem, blocks, conv_head, global_pool)")


def anatomy_of(model: nn.Module) -> Anatomy:
    """The named layers of `model`, read by the reader of its connection family."""
    return _READERS[connection_family(model)](model)


def conv_layers(model: nn.Module) -> list[str]:
    """Dotted names of the model's Conv2d modules in registration order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]


def producing_conv(model: nn.Module, layer: str) -> str:
    """`layer` itself for a conv; for another layer (a BatchNorm), the conv registered just before it,
    whose output it normalises, so that a conv's weights can be read from the BN layer a method hooks."""
    if isinstance(get_module(model, layer), nn.Conv2d):
        return layer
    previous = None
    for name, module in model.named_modules():
        if name == layer:
            break
        if isinstance(module, nn.Conv2d):
            previous = name
    if previous is None:
        raise ValueError(f"no conv layer precedes {layer!r}; pass a conv or a BN that follows one.")
    return previous


class _WholeConvAndNorm(torch.fx.Tracer):
    """Keeps every Conv2d and BatchNorm2d subclass one node of the graph, also those of other libraries
    (timm's `Conv2dSame`, `BatchNormAct2d`), which torch.fx would otherwise trace into."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, qualified_name)


def batchnorm_pairs(model: nn.Module, *, subclasses: bool = False) -> dict[str, str]:
    """conv module -> BatchNorm2d module, for every BatchNorm that directly normalises a conv's output
    that nothing else reads (the pairs a BatchNorm can be folded into), from the model's torch.fx graph.

    `subclasses=True` also pairs the conv and BatchNorm subclasses of other libraries (timm's
    `BatchNormAct2d` applies an activation after normalising): pairs to hook or replace, not to fold.
    Raises ValueError when torch.fx cannot trace the model's forward.
    """
    tracer = _WholeConvAndNorm() if subclasses else torch.fx.Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # noqa: BLE001  (any untraceable forward)
        raise ValueError(f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}); "
                         "conv-BatchNorm pairs are read from its graph.") from error
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(source, torch.fx.Node)
                and source.op == "call_module" and isinstance(modules.get(source.target), nn.Conv2d)
                and len(source.users) == 1):
            pairs[source.target] = node.target
    return pairs


def _children(model: nn.Module, parent: str) -> list[str]:
    """Dotted names of the direct children of the submodule `parent`."""
    return [f"{parent}.{name}" for name, _ in get_module(model, parent).named_children()]


def _child_or_none(model: nn.Module, name: str) -> str | None:
    return name if name in dict(model.named_children()) else None


@register("plain")
def _plain(model: nn.Module) -> Anatomy:
    """VGG convs by block (conv<block>_<k>, blocks ending in a pool), other plain networks' convs numbered."""
    features = _children(model, "features")
    convs, block, index = {}, 1, 0
    for name in features:
        module = get_module(model, name)
        if isinstance(module, nn.Conv2d):
            index += 1
            convs[f"conv{block}_{index}" if isinstance(model, VGG) else f"conv{len(convs) + 1}"] = name
        elif isinstance(module, _POOLS) and index:
            block, index = block + 1, 0
    return Anatomy("plain", convs, batchnorm_pairs(model), stem=None, blocks=(), stages=(),
                   features=features[-1], last_conv=list(convs.values())[-1], pool=_child_or_none(model, "avgpool"))


@register("residual")
def _residual(model: nn.Module) -> Anatomy:
    """ResNet: the stem ends at the max-pool, four stages of blocks."""
    children = [name for name, _ in model.named_children()]
    stages = tuple(stage for stage in ("layer1", "layer2", "layer3", "layer4") if stage in children)
    return Anatomy("residual", {name: name for name in conv_layers(model)}, batchnorm_pairs(model),
                   stem="maxpool" if "maxpool" in children else "relu",
                   blocks=tuple(block for stage in stages for block in _children(model, stage)), stages=stages,
                   features=stages[-1], last_conv=stages[-1], pool=_child_or_none(model, "avgpool"))


@register("dense")
def _dense(model: nn.Module) -> Anatomy:
    """DenseNet: the stem ends at pool0 (just before the first dense block), blocks alternate with
    transitions, and the final BatchNorm (norm5) gives the feature map."""
    features = _children(model, "features")
    stages = tuple(name for name in features if name.startswith("features.denseblock"))
    blocks = tuple(name for name in features if name.startswith(("features.denseblock", "features.transition")))
    return Anatomy("dense", {name: name for name in conv_layers(model)}, batchnorm_pairs(model),
                   stem=features[features.index(stages[0]) - 1], blocks=blocks, stages=stages,
                   features=[name for name in features if name.startswith("features.norm")][-1], last_conv=stages[-1],
                   pool=None)


@register("nas")
def _nas(model: nn.Module) -> Anatomy:
    """timm EfficientNet: the stem ends at bn1 (BN + activation), stages `blocks.i` hold MBConv blocks
    `blocks.i.j`, and the head conv_head -> bn2 (BN + activation) gives the feature map that `global_pool`
    averages and flattens. `last_conv` is bn2: the last conv's output as the network uses it."""
    stages = tuple(_children(model, "blocks"))
    return Anatomy("nas", {name: name for name in conv_layers(model)}, batchnorm_pairs(model, subclasses=True),
                   stem="bn1", blocks=tuple(block for stage in stages for block in _children(model, stage)),
                   stages=stages, features="bn2", last_conv="bn2", pool="global_pool")
