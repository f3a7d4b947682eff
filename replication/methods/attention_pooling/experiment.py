"""Notebook 02's steps: LAP inserted into trained networks and trained from scratch, its knowledge-injection
variants, and its maps against captum's and zennit's explainers on ConceptWorld's evidence masks.

- `EvidenceSet`: a split's images, classes and evidence masks (the pixels of the object that makes the
  class, ConceptWorld's `evidence/`), decoded once; training samples carry the mask for the injection loss.
- `subject_networks`: notebook 00's cached baselines (arch × seed) and the fine-tuned EfficientNet-Lite0
  of notebook 05 (the same cache entry), each with its val accuracy and its training recipe.
- `LAPRecipe` / `train_lap`: a network with LAP in place of its global pool, started from a trained
  network's weights (inserted, then fine-tuned) or from scratch, trained through the shared cache with
  the variant's loss terms (`VARIANTS`: plain, weak evidence, weak evidence + mask injection).
- `explain_all` and `map_metrics`: every explainer's maps (LAP's own, captum's, zennit's LRP and a
  random-map control) on the same images of the same model, and per image pointing game, energy in the
  mask, pixel AUROC, deletion and insertion AUC (the control's: the exact expectation of a random map for
  the first three, the mean over `control_draws` seeded draws for the curves); `sanity_table`: the parameter-randomisation check.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn

from replication.analysis import localisation as loc
from replication.analysis.attribution import LRP_COMPOSITES, explain
from replication.data.classification import ClassificationDataset
from replication.data.subsets import InMemoryDataset, seeded_indices
from replication.methods.attention_pooling.layer import (COMBINE_RULES, HEAD_MODES, INIT_STD, WEIGHT_MODES, insert_lap,
                                                         interpretation_map, lap_layers, pooling_departure)
from replication.methods.attention_pooling.losses import AttentionSparsity, MaskInjectionLoss, WeakEvidenceLoss
from replication.models.anatomy import anatomy_of
from replication.models.backbones import BackboneConfig
from replication.models.pretrained import PRETRAINED
from replication.models.surgery import eval_mode
from replication.reporting.claims import HOLM_FAMILIES
from replication.runtime import resolve_device
from replication.training.classifiers import BaselineSettings, accuracy_report, train_baselines, train_world_classifier
from replication.training.loop import Recipe, TrainConfig, TrainResult, train_cached

VARIANTS = ("plain", "weak", "weak+mask")  # loss terms of a LAP network: none, L_pos + L_neg, and + L_in + L_out
CONTROL = "random"
EXPLAINERS = ("gradcam", "integrated_gradients", "guided_backprop", "lrp")
LAP_MAPS = ("pooling", "class_head")  # LAP's explanation: the weights it pooled with, or the class's attention head


@dataclass(frozen=True)
class LAPConfig:
    """The LAP layer and how its maps are read (spec 3.3, all [I]): `where` it replaces pooling
    ("global": the classifier's pool), `class_heads` (one head per class, else `heads`), `head_mode`,
    `weight_mode`, `alpha_init`, the attention block's `reduction` and the SD of its last conv's initial
    weights `init_std` (small, not 0: at 0 a `gauss_max` LAP gets no gradient from the task loss, see
    `layer`), the map `combine` rule. alpha starts at 5: with A in [0, 1] the `gauss_max` weights of a window
    then span up to e^-5, so a learned attention decides the pooling (at 1 they span e^-1: nearly average
    pooling whatever the map); at insertion the attention is nearly uniform, so any alpha keeps the network."""

    where: str = "global"
    class_heads: bool = True
    heads: int = 1
    head_mode: str = "mean"
    weight_mode: str = "gauss_max"
    alpha_init: float = 5.0
    reduction: int = 4
    init_std: float = INIT_STD  # keyed always: LAP models cached with the old zero initialisation are retrained
    combine: str = "prod"


@dataclass(frozen=True)
class LAPSettings:
    """Notebook 02's [lap] section. `networks`: notebook 00 archs (its cached baselines, `seeds` of
    [runtime]) or a pretrained name (fine-tuned on the world with `train_overrides[name]`, notebook 05's
    recipe, one seed). `finetune`: the recipe after insertion (over the network's own learning rate
    scale: `finetune_lr_factor` × its recipe's lr). `variants` trained per network (`injection_networks`
    get every variant, the others `main_variant` only). `scratch_networks`: LAP trained from scratch with
    the arch's notebook-00 recipe. Losses: `weak_weight` (λ_w), `mask_weight` (λ_box), `sparsity_weight`
    (λ_s), `top_k`. Explanations: `explained_networks` (first seed), `images` val images (seeded by
    `subset_seed`), `ig_steps`, `lrp_composite`, `perturbation_steps`, `insertion_blur`, `pointing_tolerance`,
    `sanity_images`, `control_draws` (seeded random maps per image whose deletion and insertion curves are
    averaged for the control; its validity is the exact expectation of a random map). `lap_map`: which map
    is LAP's explanation, "pooling" (the weights its layers pooled with, head-mean: what the logits were
    computed from) or "class_head" (the explained class's attention head, for models trained with the
    class-tying weak losses; the mean attention otherwise). `skip_explainers[network]`: explainers not run
    on that network (stated in the decisions: zennit has no canonizer for timm's BatchNormAct2d, so LRP
    refuses EfficientNet-Lite0). Verdict settings: `accuracy_tolerance` (points, L2 and L4),
    `sanity_max_spearman` (L8), `min_val_acc` (%: a network below it has not learned the task and no claim
    is judged on it), `holm_family` ("claim": one Holm family per claim; "notebook": all tests in one)."""

    networks: tuple[str, ...] = ("resnet18", "alexnet_bn", "efficientnet_lite0")
    lap: LAPConfig = LAPConfig()
    finetune_epochs: int = 2
    finetune_lr_factor: float = 0.2
    train_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    main_variant: str = "weak"
    injection_networks: tuple[str, ...] = ("resnet18",)
    scratch_networks: tuple[str, ...] = ("alexnet_bn",)
    scratch_epochs: int | None = None
    weak_weight: float = 1.0
    mask_weight: float = 1.0
    sparsity_weight: float = 0.0
    top_k: int | None = None
    explained_networks: tuple[str, ...] = ("resnet18", "alexnet_bn")
    explainers: tuple[str, ...] = EXPLAINERS
    skip_explainers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    images: int = 64
    subset_seed: int = 0
    ig_steps: int = 32
    lrp_composite: str = "epsilon_plus_flat"
    perturbation_steps: int = 16
    insertion_blur: float = 5.0
    pointing_tolerance: int = 0
    sanity_images: int = 16
    control_draws: int = 8
    lap_map: str = "pooling"
    accuracy_tolerance: float = 1.0
    sanity_max_spearman: float = 0.5
    min_val_acc: float = 80.0
    holm_family: str = "claim"

    def __post_init__(self):
        problems = []
        if self.main_variant not in VARIANTS:
            problems.append(f"main_variant {self.main_variant!r} is not one of {VARIANTS}")
        for name in ("injection_networks", "scratch_networks", "explained_networks", "skip_explainers"):
            extra = sorted(set(getattr(self, name)) - set(self.networks))
            if extra:
                problems.append(f"{name} lists {extra}, which are not in networks {list(self.networks)}")
        unknown = sorted(set(self.explainers).union(*map(set, self.skip_explainers.values())) - set(EXPLAINERS))
        if unknown:
            problems.append(f"explainers {unknown} are not among {EXPLAINERS}")
        if self.finetune_epochs < 1 or self.images < 2 or self.sanity_images < 2 or self.control_draws < 1:
            problems.append("finetune_epochs >= 1, images >= 2, sanity_images >= 2 and control_draws >= 1 are needed")
        for name, value, allowed in (("lrp_composite", self.lrp_composite, LRP_COMPOSITES),
                                     ("lap.combine", self.lap.combine, COMBINE_RULES),
                                     ("lap.weight_mode", self.lap.weight_mode, WEIGHT_MODES),
                                     ("lap.head_mode", self.lap.head_mode, HEAD_MODES),
                                     ("lap_map", self.lap_map, LAP_MAPS),
                                     ("holm_family", self.holm_family, HOLM_FAMILIES)):
            if value not in allowed:
                problems.append(f"{name} {value!r} is not one of {allowed}")
        if self.ig_steps < 1 or self.perturbation_steps < 1 or self.pointing_tolerance < 0:
            problems.append(f"ig_steps ({self.ig_steps}) and perturbation_steps ({self.perturbation_steps}) must be "
                            f">= 1 and pointing_tolerance ({self.pointing_tolerance}) >= 0")
        if not self.lap.alpha_init > 0 or self.lap.init_std < 0:
            problems.append(f"lap.alpha_init ({self.lap.alpha_init}) must be > 0 and lap.init_std ({self.lap.init_std}) >= 0")
        if problems:
            raise ValueError("[lap] " + "; ".join(problems) + ".")

    def variants_of(self, network: str) -> tuple[str, ...]:
        return VARIANTS if network in self.injection_networks else (self.main_variant,)

    def loss_weights(self, variant: str) -> dict[str, float]:
        return {"weak": self.weak_weight if variant != "plain" else 0.0,
                "mask": self.mask_weight if variant == "weak+mask" else 0.0, "sparsity": self.sparsity_weight}


class EvidenceSet(torch.utils.data.Dataset):
    """A ConceptWorld split in memory: `images`, `targets` and `masks` (N × 1 × H × W floats, the evidence
    mask brought to the image size by nearest neighbour) and `indices` (each image's index in the split);
    items are `(image, class_id, {"masks": mask})`."""

    def __init__(self, root: str | Path, split: str, indices: Sequence[int] | None = None):
        dataset = ClassificationDataset(root, split)
        if dataset.layout != "conceptworld":
            raise ValueError(f"{root} has no ConceptWorld evidence masks (layout {dataset.layout}); notebook 02 "
                             "measures validity against them and runs on ConceptWorld only.")
        memory = InMemoryDataset(dataset, indices)
        chosen = list(range(len(dataset)) if indices is None else indices)
        size = tuple(memory.images.shape[-2:])
        masks = [np.asarray(Image.open(Path(root) / "evidence" / f"{Path(dataset.paths[i]).stem}.png")) > 127 for i in chosen]
        self.images, self.targets = memory.images, memory.targets
        self.masks = loc.resize_masks(torch.from_numpy(np.stack(masks)), size)[:, None].float()
        self.classes, self.indices = dataset.classes, chosen
        self.fingerprint = {**memory.fingerprint, "evidence": True}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index], {"masks": self.masks[index]}

    def subset(self, positions: Sequence[int]) -> "EvidenceSet":
        """The images at `positions` (of this set) as an `EvidenceSet`, their split indices kept."""
        subset = object.__new__(EvidenceSet)
        subset.images, subset.targets, subset.masks = self.images[positions], self.targets[positions], self.masks[positions]
        subset.classes, subset.indices = self.classes, [self.indices[p] for p in positions]
        subset.fingerprint = {**self.fingerprint, "subset": list(positions)}
        return subset


@dataclass
class Subject:
    """A trained network LAP is inserted into: its `arch`, `seed`, `model` (eval), `config`, training
    `recipe` (the one LAP from scratch and fine-tuning follow) and val accuracy in %."""

    arch: str
    seed: int
    model: nn.Module
    config: BackboneConfig
    recipe: TrainConfig
    val_acc: float


def subject_networks(settings: LAPSettings, root: str | Path, baselines: BaselineSettings, *, model: BackboneConfig,
                     train: TrainConfig, seeds: Sequence[int], batch_size: int,
                     device: str | torch.device | None = None) -> dict[tuple[str, int], Subject]:
    """Every network of `settings`: a [baselines] arch for each seed through `train_baselines` (notebook 00's
    cached models and recipes), a pretrained name fine-tuned whole on the world (`train_world_classifier`
    with `train_overrides[name]` over [train], the first seed: notebook 05's cached network)."""
    subjects, val_set = {}, ClassificationDataset(root, "val")
    for name in settings.networks:
        if name in PRETRAINED:
            config = dataclasses.replace(model, arch=name, width=1.0)
            recipe = dataclasses.replace(train, seed=seeds[0], **settings.train_overrides.get(name, {}))
            network = train_world_classifier(root, config, recipe, device=device).model.eval()
            report = accuracy_report(network, val_set, batch_size=batch_size, device=device)
            subjects[name, seeds[0]] = Subject(name, seeds[0], network, config, recipe, 100 * report["accuracy"])
            continue
        only = dataclasses.replace(baselines, archs=(name,), layers={name: baselines.layers[name]}, pretrained=(),
                                   rotation_layers={})
        trained = train_baselines(root, only, model=model, train=train, seeds=seeds, batch_size=batch_size, device=device)
        config = dataclasses.replace(model, arch=name, **baselines.model_overrides.get(name, {}))
        for row in trained.accuracy.itertuples():
            subjects[name, row.seed] = Subject(name, row.seed, trained.models[name, row.seed].eval(), config,
                                               dataclasses.replace(trained.recipes[name], seed=row.seed), row.val_acc)
    return subjects


def state_fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights: what identifies the trained network LAP starts from in a cache key."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class LAPRecipe(Recipe):
    """`config`'s network with LAP (`lap`), from `start` (a trained network's weights; None: from scratch),
    trained with the loss terms of `weights` (weak, mask, sparsity; `top_k`)."""

    config: BackboneConfig
    num_classes: int
    lap: LAPConfig
    weights: Mapping[str, float]
    top_k: int | None = None
    image_size: int = 64
    start: nn.Module | None = field(default=None, compare=False)

    def build(self) -> nn.Module:
        model = self.config.build(self.num_classes)
        if self.start is not None:
            model.load_state_dict(self.start.state_dict())
        heads = self.num_classes if self.lap.class_heads else self.lap.heads
        insert_lap(model, where=self.lap.where, heads=heads, head_mode=self.lap.head_mode, weight_mode=self.lap.weight_mode,
                   alpha_init=self.lap.alpha_init, reduction=self.lap.reduction, init_std=self.lap.init_std,
                   image_size=self.image_size)
        return model

    def key(self, model: nn.Module) -> dict[str, Any]:
        return {"model": self.config, "lap": self.lap, "loss": dict(self.weights), "top_k": self.top_k,
                "start": state_fingerprint(self.start) if self.start is not None else None}

    def loss_terms(self, model: nn.Module) -> list:
        terms = []
        for name in lap_layers(model):
            block = f"{name}.attention"
            if self.weights.get("weak", 0) > 0:
                terms.append(WeakEvidenceLoss(block, self.weights["weak"], self.top_k))
            if self.weights.get("mask", 0) > 0:
                terms.append(MaskInjectionLoss(block, self.weights["mask"]))
            if self.weights.get("sparsity", 0) > 0:
                terms.append(AttentionSparsity(block, self.weights["sparsity"]))
        return terms


def train_lap(subject: Subject, variant: str, settings: LAPSettings, train_set: EvidenceSet, val_set: EvidenceSet, *,
              from_scratch: bool = False, device: str | torch.device | None = None) -> TrainResult:
    """LAP in `subject`'s network: inserted into its trained weights and fine-tuned (`finetune_epochs` at
    `finetune_lr_factor` × its recipe's lr, the rest of its recipe), or trained from scratch with its recipe
    (`scratch_epochs` if set), with `variant`'s losses; through the shared cache (kind "lap")."""
    recipe = subject.recipe
    if from_scratch:
        config = dataclasses.replace(recipe, epochs=settings.scratch_epochs or recipe.epochs)
    else:
        config = dataclasses.replace(recipe, epochs=settings.finetune_epochs, lr=recipe.lr * settings.finetune_lr_factor)
    lap_recipe = LAPRecipe(subject.config, len(train_set.classes), settings.lap, settings.loss_weights(variant),
                           settings.top_k, int(train_set.images.shape[-1]), None if from_scratch else subject.model)
    result = train_cached("lap", lap_recipe, train_set, config=config, val_set=InMemoryView(val_set), device=device)
    result.model.eval()
    return result


class InMemoryView(torch.utils.data.Dataset):
    """An `EvidenceSet` as plain `(image, class_id)` pairs (evaluation reads no masks)."""

    def __init__(self, data: EvidenceSet):
        self.data, self.fingerprint = data, data.fingerprint

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.data.images[index], self.data.targets[index]


def map_head(settings: LAPSettings, variant: str, lap_map: str | None = None) -> str:
    """Which map of LAP is read (`lap_map`, default `settings.lap_map`): "pooling", the weights it pooled
    with; for "class_head" the explained class's head when a loss ties heads to classes, else the mean."""
    if (lap_map or settings.lap_map) == "pooling":
        return "pooling"
    return "class" if settings.lap.class_heads and variant != "plain" else "mean"


def lap_explainer(settings: LAPSettings, variant: str, lap_map: str | None = None):
    """LAP's own map as an `explain` method (`map_head`; the target's head for class heads)."""
    def run(model, images, target):
        head = map_head(settings, variant, lap_map)
        head = target if head == "class" else head
        return interpretation_map(model, images, combine=settings.lap.combine, head=head)[0]
    return run


def random_explainer(seed: int):
    """The control: a seeded uniform random map per image (no information about model or image)."""
    generator = torch.Generator().manual_seed(seed)
    return lambda model, images, target: torch.rand(images.shape[0], *images.shape[-2:], generator=generator).to(images.device)


def random_draws(maps: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """`maps` (the control's explained draw) and `count` - 1 more seeded uniform random maps of its shape."""
    generator = torch.Generator().manual_seed(seed)
    return [maps] + [torch.rand(maps.shape, generator=generator) for _ in range(count - 1)]


def explainer_options(settings: LAPSettings, gradcam_layer: str) -> dict[str, dict[str, Any]]:
    """Each library explainer's `explain` options from the settings (the others take none)."""
    return {"gradcam": dict(layer=gradcam_layer), "integrated_gradients": dict(steps=settings.ig_steps),
            "lrp": dict(composite=settings.lrp_composite)}


def explain_all(model: nn.Module, images: torch.Tensor, settings: LAPSettings, variant: str | None, *, gradcam_layer: str,
                batch_size: int, device: str | torch.device | None = None,
                skip: Sequence[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every explainer's maps of `images` on `model` (LAP's own when `variant` names the LAP model, then
    each of `settings.explainers` but those in `skip`, then the random control), all explaining the
    predicted class, and the seconds per image each took."""
    methods: dict[str, Any] = {}
    if variant is not None:
        methods["LAP"] = lap_explainer(settings, variant)
    methods.update({name: name for name in settings.explainers if name not in skip})
    methods[CONTROL] = random_explainer(settings.subset_seed)
    options = explainer_options(settings, gradcam_layer)
    maps, seconds = {}, {}
    for name, method in methods.items():
        started = time.perf_counter()
        maps[name] = explain(model, images, method, batch_size=batch_size, device=device, **options.get(name, {}))
        seconds[name] = (time.perf_counter() - started) / len(images)
    return maps, seconds


def predicted_classes(model: nn.Module, images: torch.Tensor, *, batch_size: int,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """`model`'s predicted class per image (CPU), in batches on `device`, in eval mode (its mode restored)."""
    device = resolve_device(device)
    with torch.no_grad(), eval_mode(model):
        model.to(device)
        return torch.cat([model(images[s:s + batch_size].to(device)).argmax(1).cpu() for s in range(0, len(images), batch_size)])


def map_metrics(model: nn.Module, data: EvidenceSet, maps: Mapping[str, torch.Tensor], settings: LAPSettings, *,
                batch_size: int, device: str | torch.device | None = None) -> tuple[pd.DataFrame, dict[str, torch.Tensor]]:
    """Per method and image: pointing game, energy in the mask, pixel AUROC, deletion and insertion AUC
    (the predicted class's probability), with the image's position, split index (`val_index`) and class,
    and whether the map is constant (its
    pointing game is then NaN); and the mean curves per method and mode. The random control (`CONTROL`)
    scores the exact expectation of a random map on the first three (`random_map_expectation`) and the
    mean curve of `control_draws` seeded draws (its map the first) on the last two."""
    masks = data.masks[:, 0] > 0.5
    predicted = predicted_classes(model, data.images, batch_size=batch_size, device=device)
    rows, curves = [], {}
    for name, method_maps in maps.items():
        if name == CONTROL:
            values = {"constant_map": torch.zeros(len(method_maps), dtype=torch.bool),
                      **loc.random_map_expectation(masks, tolerance=settings.pointing_tolerance)}
            draws = random_draws(method_maps, settings.control_draws, settings.subset_seed + 1)
        else:
            values = {"constant_map": loc.constant_maps(method_maps),
                      "pointing": loc.pointing_game(method_maps, masks, tolerance=settings.pointing_tolerance),
                      "energy": loc.energy_in_mask(method_maps, masks), "auroc": loc.pixel_auroc(method_maps, masks)}
            draws = [method_maps]
        for mode in loc.MODES:
            curve = torch.stack([loc.perturbation_curves(model, data.images, draw, mode=mode, target=predicted,
                                                         steps=settings.perturbation_steps, blur_sigma=settings.insertion_blur,
                                                         batch_size=batch_size, device=device) for draw in draws]).mean(0)
            values[mode] = loc.curve_auc(curve)
            curves[name, mode] = curve.mean(0)
        rows.append(pd.DataFrame({"method": name, "image": range(len(data)), "val_index": data.indices,
                                  "class_id": data.targets.numpy(),
                                  "correct": (predicted == data.targets).numpy(),
                                  **{k: v.numpy() for k, v in values.items()}}))
    return pd.concat(rows, ignore_index=True), curves


def sanity_table(model: nn.Module, images: torch.Tensor, settings: LAPSettings, variant: str, *, gradcam_layer: str,
                 batch_size: int, device: str | torch.device | None = None, skip: Sequence[str] = ()) -> pd.DataFrame:
    """The randomisation check for LAP and each explainer: the model's top-level children re-initialised
    from the top down (`randomisation_similarity`), Spearman of each map with the trained model's, every
    map explaining the trained model's predicted class (a randomised model's prediction would change the
    class explained, not only the map)."""
    frames, options = [], explainer_options(settings, gradcam_layer)
    stages = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    target = predicted_classes(model, images, batch_size=batch_size, device=device)
    for name in ("LAP", *(e for e in settings.explainers if e not in skip)):
        method = lap_explainer(settings, variant) if name == "LAP" else name

        def explainer(network, x, method=method, options=options.get(name, {})):
            return explain(network, x, method, target=target, batch_size=batch_size, device=device, **options)

        frames.append(loc.randomisation_similarity(model, images, explainer, seed=settings.subset_seed,
                                                   layers=stages).assign(method=name, stage=lambda f: range(1, len(f) + 1)))
    return pd.concat(frames, ignore_index=True)


def gradcam_layer(subject: Subject) -> str:
    """Grad-CAM's layer: the network's last conv stage (`anatomy.last_conv`), read before LAP is inserted."""
    return anatomy_of(subject.model).last_conv


def explained_subset(data: EvidenceSet, count: int, seed: int) -> EvidenceSet:
    """A seeded subset of `count` images of an `EvidenceSet` (all when it holds fewer)."""
    return data.subset(seeded_indices(len(data), count, seed=seed) or list(range(len(data))))


@dataclass
class Runs:
    """Notebook 02's measurements. `accuracy`: one row per network, seed and model (original, LAP at
    insertion, LAP fine-tuned per variant, LAP from scratch) with its val accuracy in %; `histories`
    (LAP training curves); `maps` (per explained network: method -> N × H × W) of `images` (its
    `EvidenceSet`); `metrics` (per image and method, `map_metrics`, with `network`, the training `seed` and
    `model` = "LAP" or "plain"); `curves[network, model, method, mode]`; `seconds` (per image, per explainer);
    `sanity` (with the training `seed` and `subset_seed`);
    `injection`: per injection network, seed and variant, LAP map validity on the explained images."""

    accuracy: pd.DataFrame
    histories: pd.DataFrame
    maps: dict[str, dict[str, torch.Tensor]]
    images: EvidenceSet
    metrics: pd.DataFrame
    curves: dict[tuple[str, str, str, str], torch.Tensor]
    seconds: pd.DataFrame
    sanity: pd.DataFrame
    injection: pd.DataFrame
    models: dict[tuple[str, int, str], nn.Module]


def injection_validity(model: nn.Module, images: EvidenceSet, settings: LAPSettings, variant: str, *, batch_size: int,
                       device: str | torch.device | None = None) -> dict[str, float]:
    """LAP map validity on the explained images (constant maps counted; pointing, energy, pixel AUROC means)
    for the explained map (`settings.lap_map`), and, for a "pooling" explanation, the class head's energy
    (`class_head_energy`: what the weak and mask losses train, diluted in the pooling by the other heads)."""
    masks = images.masks[:, 0] > 0.5

    def maps_of(lap_map: str | None) -> torch.Tensor:
        return explain(model, images.images, lap_explainer(settings, variant, lap_map), batch_size=batch_size, device=device)

    maps = maps_of(None)
    out = {"constant_maps": int(loc.constant_maps(maps).sum()),
           "pointing": float(loc.pointing_game(maps, masks, tolerance=settings.pointing_tolerance).nanmean()),
           "energy": float(loc.energy_in_mask(maps, masks).nanmean()),
           "auroc": float(loc.pixel_auroc(maps, masks).nanmean())}
    if settings.lap_map == "pooling":
        out["class_head_energy"] = float(loc.energy_in_mask(maps_of("class_head"), masks).nanmean())
    return out


def run_experiment(settings: LAPSettings, subjects: Mapping[tuple[str, int], Subject], train_set: EvidenceSet,
                   val_set: EvidenceSet, *, batch_size: int, device: str | torch.device | None = None) -> Runs:
    """Every training and measurement of the notebook (see `Runs`): per subject, LAP inserted (accuracy
    at insertion, then fine-tuned per variant) and from scratch for `scratch_networks`; per explained
    network (first seed) every explainer on the LAP model and on the plain network, their metrics and
    curves and the sanity check; LAP map validity per injection variant and seed."""
    rows, histories, models = [], [], {}
    images = explained_subset(val_set, settings.images, settings.subset_seed)
    injection = []
    for (name, seed), subject in subjects.items():
        rows.append({"network": name, "seed": seed, "model": "original", "val_acc": subject.val_acc})
        with torch.random.fork_rng(devices=[]):  # the start of fine-tuning: built after seeding, as train_cached does
            torch.manual_seed(subject.recipe.seed)
            inserted = LAPRecipe(subject.config, len(train_set.classes), settings.lap, {},
                                 image_size=int(train_set.images.shape[-1]), start=subject.model).build()
        predicted = predicted_classes(inserted, val_set.images, batch_size=batch_size, device=device)
        rows.append({"network": name, "seed": seed, "model": "LAP inserted",
                     "val_acc": 100 * float((predicted == val_set.targets).float().mean()),
                     "pooling_departure": float(pooling_departure(inserted, images.images, batch_size=batch_size, device=device).mean())})
        runs = [(variant, False) for variant in settings.variants_of(name)]
        if name in settings.scratch_networks:
            runs.append((settings.main_variant, True))
        for variant, scratch in runs:
            result = train_lap(subject, variant, settings, train_set, val_set, from_scratch=scratch, device=device)
            label = f"LAP {'scratch' if scratch else 'fine-tuned'} ({variant})"
            models[name, seed, label] = result.model
            departure = float(pooling_departure(result.model, images.images, batch_size=batch_size, device=device).mean())
            rows.append({"network": name, "seed": seed, "model": label, "val_acc": 100 * result.history.val_acc.iloc[-1],
                         "pooling_departure": departure})
            histories.append(result.history.assign(network=name, seed=seed, model=label))
            if not scratch and name in settings.injection_networks:
                injection.append({"network": name, "seed": seed, "variant": variant, "val_acc": rows[-1]["val_acc"],
                                  "pooling_departure": departure,
                                  **injection_validity(result.model, images, settings, variant, batch_size=batch_size, device=device)})
    maps_by_network, metrics, curves, seconds, sanity = {}, [], {}, [], []
    for name in settings.explained_networks:
        seed = min(s for n, s in subjects if n == name)
        subject, layer = subjects[name, seed], gradcam_layer(subjects[name, seed])
        lap_model = models[name, seed, f"LAP fine-tuned ({settings.main_variant})"]
        for label, model, variant in (("LAP", lap_model, settings.main_variant), ("plain", subject.model, None)):
            maps, timing = explain_all(model, images.images, settings, variant, gradcam_layer=layer,
                                       batch_size=batch_size, device=device, skip=settings.skip_explainers.get(name, ()))
            table, mean_curves = map_metrics(model, images, maps, settings, batch_size=batch_size, device=device)
            metrics.append(table.assign(network=name, seed=seed, model=label))
            curves.update({(name, label, method, mode): curve for (method, mode), curve in mean_curves.items()})
            seconds.append(pd.DataFrame({"network": name, "seed": seed, "model": label, "method": list(timing),
                                         "seconds_per_image": list(timing.values())}))
            if label == "LAP":
                maps_by_network[name] = maps
        sanity.append(sanity_table(lap_model, images.images[:settings.sanity_images], settings, settings.main_variant,
                                   gradcam_layer=layer, batch_size=batch_size, device=device,
                                   skip=settings.skip_explainers.get(name, ()))
                      .assign(network=name, seed=seed, subset_seed=settings.subset_seed))
    return Runs(pd.DataFrame(rows), pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(),
                maps_by_network, images, pd.concat(metrics, ignore_index=True), curves,
                pd.concat(seconds, ignore_index=True), pd.concat(sanity, ignore_index=True), pd.DataFrame(injection), models)


def accuracy_summary(accuracy: pd.DataFrame) -> pd.DataFrame:
    """Val accuracy (%) per network and model: mean, SD over seeds and the number of seeds; and the mean
    departure of LAP's pooling from average pooling on the explained images (`pooling_departure`, NaN for
    the original networks)."""
    groups = accuracy.groupby(["network", "model"], sort=False)
    table = (groups.val_acc.agg(["mean", "std", "count"])
             .rename(columns={"mean": "val_acc_mean", "std": "val_acc_sd", "count": "seeds"}))
    if "pooling_departure" in accuracy:
        table["pooling_departure"] = groups.pooling_departure.mean()
    return table


def metrics_summary(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per network, model and method: the mean of each map metric over the explained images (NaN skipped:
    a constant map has no pointing game) and the number of constant maps."""
    columns = ["pointing", "energy", "auroc", "deletion", "insertion"]
    groups = metrics.groupby(["network", "model", "method"], sort=False)
    return groups[columns].mean().assign(constant_maps=groups.constant_map.sum().astype(int))
