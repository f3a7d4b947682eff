"""Which layers CGL regularises and dissects, per architecture (the paper's and the code's choices)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from replication.models.anatomy import anatomy_of, conv_layers, producing_conv

# Where L_g and L_s act by default: VGG16 exposes only conv4_3, conv5_1, conv5_2 to them in the code
# [C], with BN the BatchNorm after each (psi's BN form [P]); every other model gets every conv layer
# (spec section 9.2 [I]). The layers the paper dissects (Table 2): VGG16 conv3_3, conv4_3, conv5_1..3
# [P]; AlexNet conv1-5, i.e. every conv. Convs by the paper's names (`models.anatomy`). AlexNet-B
# (`alexnet_bn`): every conv, read at its BN (psi's BN form [P]).
ACTIVATION_CONVS = {arch: ("conv4_3", "conv5_1", "conv5_2") for arch in ("vgg16", "vgg16_bn")}
DISSECTED_CONVS = {arch: ("conv3_3", "conv4_3", "conv5_1", "conv5_2", "conv5_3") for arch in ("vgg16", "vgg16_bn")}


def activation_layers(arch: str, model: nn.Module) -> tuple[str, ...]:
    """The layers that receive L_g and L_s for `arch` (see `ACTIVATION_CONVS`): with BN (`*_bn`) the BN
    after each conv, for psi's BN form [P]."""
    if arch not in ACTIVATION_CONVS and not arch.endswith("_bn"):
        return tuple(conv_layers(model))
    body = anatomy_of(model)
    convs = (body.conv(name) for name in ACTIVATION_CONVS[arch]) if arch in ACTIVATION_CONVS else conv_layers(model)
    return tuple(body.batchnorms.get(conv, conv) for conv in convs)


def dissected_layers(arch: str, model: nn.Module) -> tuple[str, ...]:
    """The layers dissected for `arch`, in the order of the paper's Table 2 columns."""
    if arch not in DISSECTED_CONVS:
        return tuple(conv_layers(model))
    return tuple(anatomy_of(model).conv(name) for name in DISSECTED_CONVS[arch])


def grouped_layers(model: nn.Module, layers: Sequence[str], *, groups: int, min_group_size: int) -> tuple[str, ...]:
    """The `layers` (convs, or the BN after one) whose conv has at least `min_group_size` filters in each
    of `groups` groups; the others stay ungrouped (no R_bn, L_g or L_s) [I]."""
    return tuple(layer for layer in layers
                 if model.get_submodule(producing_conv(model, layer)).out_channels // groups >= min_group_size)
