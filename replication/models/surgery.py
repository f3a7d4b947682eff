"""Reusable model transforms and mode switches: what several papers do to a network around their method.

`eval_mode` and `frozen` are context managers that restore exactly what they changed, so analysis code
never leaves a model in another mode than it found it. `replace_module` swaps one named layer (concept
whitening replaces BatchNorm layers, attention pooling the pooling layer); `fold_batchnorm` merges each
BatchNorm into the conv before it, a copy that computes the same function faster in eval mode.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Collection, Iterator

import torch
from torch import nn

from replication.models.anatomy import batchnorm_pairs
from replication.models.hooks import get_module


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block; restore each module's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """`eval_mode`, and no parameter requires gradients inside the block (a fixed network that only
    inputs or added parameters are optimised through); every flag is restored afterwards."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    with eval_mode(model):
        try:
            for parameter, _ in flags:
                parameter.requires_grad_(False)
            yield model
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put `new_module` where the submodule `name` (dotted) was; return the module it replaced.

    An unknown name raises `hooks.get_module`'s error, which lists the nearest valid names.
    """
    old = get_module(model, name)
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new_module)
    return old


def fold_batchnorm(model: nn.Module, keep: Collection[str] = ()) -> nn.Module:
    """A copy of `model` in which every BatchNorm2d that directly normalises a conv's output (and only it)
    is merged into that conv and replaced by an identity; `model` itself is unchanged.

    The conv becomes w * gamma / sqrt(var + eps) with bias (b - mean) * gamma / sqrt(var + eps) + beta, so
    the copy computes what `model` computes in eval mode (running statistics). A pair with either module
    named in `keep` (e.g. where hooks will read or change outputs) is left as it is, and so is every
    pair of a model torch.fx cannot trace (see `anatomy.batchnorm_pairs`).
    """
    folded = copy.deepcopy(model)
    try:
        pairs = batchnorm_pairs(folded)
    except ValueError:  # untraceable forward: nothing is known to be foldable
        return folded
    for conv_name, bn_name in pairs.items():
        if {conv_name, bn_name} & set(keep):
            continue
        conv, bn = get_module(folded, conv_name), replace_module(folded, bn_name, nn.Identity())
        with torch.no_grad():
            scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=conv.weight.requires_grad)
    return folded
