"""Forward hooks by module name: read a layer's output without editing the model.

`capture_activations` owns its hooks and removes them on exit, also when the block raises, so a
model is never left with stray hooks (which would keep tensors alive and slow every later forward).
`forward_until` reads layers the same way but ends each forward pass once they have all run, so an
analysis of early layers does not pay for the rest of the network.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

_LISTED = 10  # layer names shown in an unknown-layer error


def layer_names(model: nn.Module) -> list[str]:
    """Dotted names of every submodule of `model`, in registration order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called `name` (dotted, as in `named_modules()`).

    Every layer name is resolved here, so an unknown one always gets the same error: all valid names
    for a small model, else the nearest few and the top-level modules (a DenseNet has hundreds).
    """
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    names = layer_names(model)
    if len(names) <= _LISTED:
        raise ValueError(f"unknown layer {name!r}; valid layers: {', '.join(names)}")
    nearest = difflib.get_close_matches(str(name), names, n=_LISTED)
    top_level = [child for child, _ in model.named_children()]
    raise ValueError(
        f"unknown layer {name!r} in {type(model).__name__} ({len(names)} layers); "
        f"nearest: {', '.join(nearest) or 'none'}; top-level: {', '.join(top_level[:_LISTED])}"
        f"{', ...' if len(top_level) > _LISTED else ''} (all: replication.models.hooks.layer_names(model))"
    )


@contextlib.contextmanager
def capture_activations(
    model: nn.Module, layers: str | Iterable[str], *, detach: bool = True, clone: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a dict `name -> output` refreshed by every forward pass of `model` inside the block.

    `detach=True` stores outputs cut from the graph (analysis); `detach=False` keeps the graph so
    loss terms can back-propagate through the captured activations (training). `clone=True` copies
    the output (differentiably) so that later in-place operations of the forward pass, such as
    ResNet's `out += identity` after `bn2` or `ReLU(inplace=True)`, cannot change what was captured.
    A layer whose output is a tuple stores its first element.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = {name: get_module(model, name) for name in names}  # validate every name before hooking
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, _inputs, output) -> None:
            if isinstance(output, (tuple, list)):
                output = output[0]
            if detach:
                output = output.detach()
            captured[name] = output.clone() if clone else output

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class _LayersReached(Exception):
    """Raised by a hook to end a forward pass once every requested layer has run."""


@contextlib.contextmanager
def forward_until(
    model: nn.Module, layers: str | Iterable[str]
) -> Iterator[Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """Yield `run(inputs) -> {layer: output}`: a forward pass that stops as soon as all `layers` have run.

    Outputs are captured as by `capture_activations` (detached, cloned); the modules after the last of
    them to run are skipped. A module called twice in one forward pass is read at its last call before
    the set completes. A layer the forward pass never calls is an error, not a missing key.
    """
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    pending: set[str] = set()

    def stop_when_done(name: str):
        def hook(*_args) -> None:
            pending.discard(name)
            if not pending:
                raise _LayersReached

        return hook

    with capture_activations(model, names) as captured:
        # registered after capture's hooks, so each output is stored before the pass is stopped
        handles = [get_module(model, name).register_forward_hook(stop_when_done(name)) for name in names]

        def run(inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            captured.clear()
            pending.update(names)
            try:
                model(inputs)
            except _LayersReached:
                pass
            missing = [name for name in names if name not in captured]
            if missing:
                raise ValueError(
                    f"layers {missing} did not run in the forward pass of {type(model).__name__}; "
                    "choose modules that its forward calls."
                )
            return {name: captured[name] for name in names}

        try:
            yield run
        finally:
            for handle in handles:
                handle.remove()
