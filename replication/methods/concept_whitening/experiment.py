"""Notebook 01's steps: the [cw] settings (`CWSettings`), the subject networks (notebook 00's ResNet-18
baselines, notebook 05's fine-tuned EfficientNet-Lite0, through the shared cache), the fine-tuning of
each with its BatchNorm kept, flat CW or hierarchical CW (`FinetuneRecipe`, same budget for all), and
the evaluation of every fine-tuned network (`evaluate_network`: accuracy per class, purity AUC per node,
similarity matrix, axis correlation, concept importance, top images, dissection labels of the axes).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from replication.analysis.dissection import DissectionConfig, dissect
from replication.data.broden import BrodenDataset
from replication.data.classification import ClassificationDataset
from replication.data.subsets import InMemoryDataset
from replication.methods.concept_whitening import metrics
from replication.methods.concept_whitening.alignment import (ConceptAlignment, ConceptSets, ConceptTree,
                                                             calibrate_statistics)
from replication.methods.concept_whitening.whitening import TRACE_COLUMNS, ConceptWhitening, replace_with_cw
from replication.models.backbones import BackboneConfig
from replication.models.hooks import get_module
from replication.runtime import progress, resolve_device
from replication.training.classifiers import BaselineSettings, train_baselines, train_world_classifier
from replication.training.loop import Recipe, TrainConfig, predict, train_cached

VARIANTS = ("bn", "flat", "ancestor", "matched")
MAIN, SECOND_DEPTH, TWO_DEPTHS = "main", "second depth", "two depths"  # where a run's CW sits (`Finetuned.placement`)
VARIANT_NAMES = {"bn": "BN (kept)", "flat": "flat CW (H0)", "ancestor": "hierarchical CW (H1)",
                 "matched": "weight-matched flat CW (H0w)"}


def _default_finetune() -> TrainConfig:
    return TrainConfig(epochs=3, batch_size=64, lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="cosine",
                       augment="flip_crop")


@dataclass(frozen=True)
class CWSettings:
    """Notebook 01's [cw] section.

    `networks`: subject networks, each the profile's [model] with `model_overrides[network]` (arch set to
    the network's name) trained by `start_recipes[network]` over [train] (notebook 00's recipe for the
    ResNet-18 baseline, notebook 05's for the fine-tuned EfficientNet-Lite0: the same cached models);
    `network_seeds[network]` caps how many of the runtime seeds it uses (None = all). `layers[network]`:
    the BatchNorm CW replaces; `second_layers[network]`: another depth, where the hierarchical variant is
    also run alone ("second depth") and together with the main layer ("two depths"). `levels` of the ConceptWorld tree get an axis each (2: superclasses and
    objects); `objective` settings `lambda_h`, alignment `interval`, `concept_batch`, `cayley_steps`,
    activation `mode`; crops per leaf for alignment (train split) and evaluation (val split);
    `finetune`: the budget every variant gets; `folds` of the purity AUC; `importance_images` and
    `importance_permutations` (mean and SD over that many permutations),
    `top_k`; `accuracy_tolerance` (points, claim T5); `dissect_axes` (the dissection check);
    `calibration_images`: that many training images (seeded) re-estimate the CW layers' running statistics
    before the first alignment and before evaluation (`alignment.calibrate_statistics`; 0: off, the
    official EMA only). `variants` may add "matched", the weight-matched flat CW control of H1."""

    networks: tuple[str, ...] = ("resnet18", "efficientnet_lite0")
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    start_recipes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    network_seeds: Mapping[str, int] = field(default_factory=dict)
    layers: Mapping[str, str] = field(default_factory=lambda: {"resnet18": "layer4.1.bn1",
                                                               "efficientnet_lite0": "blocks.4.2.bn3"})
    second_layers: Mapping[str, str] = field(default_factory=lambda: {"resnet18": "layer3.0.bn1"})
    variants: tuple[str, ...] = VARIANTS
    levels: int = 2
    lambda_h: float = 1.0
    interval: int = 20
    concept_batch: int = 64
    cayley_steps: int = 2
    mode: str = "pool_max"
    train_crops_per_leaf: int | None = 100
    eval_crops_per_leaf: int | None = 60
    finetune: TrainConfig = field(default_factory=_default_finetune)
    folds: int = 5
    importance_images: int = 200
    importance_permutations: int = 5
    top_k: int = 10
    accuracy_tolerance: float = 1.0
    dissect_axes: bool = True
    calibration_images: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        missing = [n for n in self.networks if n not in self.layers]
        if missing:
            raise ValueError(f"[cw] layers names no BatchNorm for {missing}; add layers.<network> = \"<module name>\".")
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or "bn" not in self.variants:
            raise ValueError(f"[cw] variants = {self.variants}: choose among {VARIANTS}, and keep \"bn\" (the control).")
        if self.folds < 2:
            raise ValueError(f"[cw] folds = {self.folds}: the purity AUC needs at least 2 folds.")


def _digest(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class Subject:
    """A trained network to fine-tune: its config, weights (`state`, digest `start`) and val accuracy."""

    network: str
    seed: int
    config: BackboneConfig
    state: dict[str, torch.Tensor]
    start: str
    val_accuracy: float


def subjects(settings: CWSettings, root: str | Path, baselines: BaselineSettings, *, model: BackboneConfig,
             train: TrainConfig, seeds: Sequence[int], batch_size: int,
             device: str | torch.device | None = None) -> dict[tuple[str, int], Subject]:
    """Every network of `settings` for its seeds, from the shared classifier cache: an arch of notebook
    00's [baselines] with its recipe (`train_baselines`), any other (the pretrained EfficientNet-Lite0)
    the [model] section with its `model_overrides` trained by its `start_recipes` over [train] (notebook
    05's fine-tuned network)."""
    found = {}
    for network in settings.networks:
        chosen = list(seeds)[:settings.network_seeds.get(network, len(seeds))]
        if network in baselines.archs:
            only = dataclasses.replace(baselines, archs=(network,), layers={network: []}, pretrained=(), rotation_layers={})
            trained = train_baselines(root, only, model=model, train=train, seeds=chosen, batch_size=batch_size, device=device)
            config = dataclasses.replace(model, arch=network, **baselines.model_overrides.get(network, {}))
            results = {seed: (trained.models[network, seed], float(trained.accuracy.set_index("seed").val_acc[seed]))
                       for seed in chosen}
        else:
            config = dataclasses.replace(model, arch=network, **settings.model_overrides.get(network, {}))
            results = {}
            for seed in chosen:
                result = train_world_classifier(root, config, dataclasses.replace(
                    train, seed=seed, **settings.start_recipes.get(network, {})), device=device)
                results[seed] = (result.model, 100 * float(result.history["val_acc"].iloc[-1]))
        for seed, (network_model, accuracy) in results.items():
            state = {k: v.detach().cpu().clone() for k, v in network_model.state_dict().items()}
            found[network, seed] = Subject(network, seed, config, state, _digest(state), accuracy)
    return found


@dataclass(frozen=True)
class FinetuneRecipe(Recipe):
    """A subject network (its config and weights) with `layers` replaced by CW (none for the "bn"
    variant), aligned by `alignment` (None for "bn") while fine-tuning."""

    config: BackboneConfig
    num_classes: int
    start: str
    variant: str
    layers: tuple[str, ...] = ()
    mode: str = "pool_max"
    alignment: ConceptAlignment | None = field(default=None, metadata={"cache_key": False})
    state: Mapping[str, torch.Tensor] | None = field(default=None, repr=False, metadata={"cache_key": False})

    def build(self) -> nn.Module:
        model = self.config.build(self.num_classes)
        model.load_state_dict(dict(self.state))
        if self.variant != "bn":
            replace_with_cw(model, self.layers, mode=self.mode)
        return model

    def key(self, model: nn.Module) -> dict[str, Any]:
        return {"model": self.config, "start": self.start, "variant": self.variant, "layers": list(self.layers),
                "mode": self.mode}

    def step_callbacks(self, model: nn.Module):
        return () if self.alignment is None else (self.alignment,)


@dataclass
class Finetuned:
    """One fine-tuned network: which (network, seed, variant, layers), the model and its history;
    `placement`: CW at the network's main layer, alone at its second depth, or at both (`MAIN`,
    `SECOND_DEPTH`, `TWO_DEPTHS`)."""

    network: str
    seed: int
    variant: str
    layers: tuple[str, ...]
    model: nn.Module
    history: pd.DataFrame
    placement: str = MAIN

    @property
    def name(self) -> str:
        return f"{self.network}_s{self.seed}_{self.variant}" + ("" if self.placement == MAIN else "_" + "+".join(self.layers))


@dataclass
class TaskData:
    """The world's classification task decoded once: train and val splits and the class names."""

    train: InMemoryDataset
    val: InMemoryDataset
    classes: list[str]

    @classmethod
    def load(cls, root: str | Path) -> TaskData:
        train = ClassificationDataset(root, "train")
        return cls(InMemoryDataset(train), InMemoryDataset(ClassificationDataset(root, "val")), list(train.classes))


def finetune(subject: Subject, variant: str, layers: Sequence[str], settings: CWSettings, tree: ConceptTree,
             concepts: ConceptSets, task: TaskData, *, placement: str = MAIN,
             device: str | torch.device | None = None) -> Finetuned:
    """Fine-tune `subject` with the variant's layer(s) (cached: kind "cw_finetune"), `settings.finetune`
    seeded with the subject's seed; with `settings.calibration_images`, the CW layers' running statistics
    are re-estimated before the first alignment and again after fine-tuning (before evaluation)."""
    train_set, val_set = task.train, task.val
    chosen = torch.randperm(len(train_set.images), generator=torch.Generator().manual_seed(subject.seed))
    calibration = train_set.images[chosen[:settings.calibration_images]] if settings.calibration_images else None
    alignment = None if variant == "bn" else ConceptAlignment(
        tuple(layers), tree, concepts.fingerprint(), interval=settings.interval, objective=variant,
        lambda_h=settings.lambda_h, concept_batch=settings.concept_batch, cayley_steps=settings.cayley_steps,
        seed=subject.seed, concepts=concepts, calibration=settings.calibration_images, calibration_images=calibration)
    recipe = FinetuneRecipe(subject.config, len(task.classes), subject.start, variant,
                            tuple(layers) if variant != "bn" else (), settings.mode, alignment, subject.state)
    config = dataclasses.replace(settings.finetune, seed=subject.seed)
    result = train_cached("cw_finetune", recipe, train_set, config=config, val_set=val_set, device=device)
    if alignment is not None and calibration is not None:
        calibrate_statistics(result.model, layers, calibration, batch_size=settings.concept_batch)
    return Finetuned(subject.network, subject.seed, variant, tuple(layers), result.model.eval(), result.history, placement)


def read_layer(finetuned: Finetuned, layer: str) -> str:
    """The module whose output holds the axes: a CW layer's rotated map, or the BatchNorm itself."""
    module = get_module(finetuned.model, layer)
    return f"{layer}.rotated" if isinstance(module, ConceptWhitening) else layer


@dataclass
class Evaluation:
    """Everything measured on one fine-tuned network at one layer (see `evaluate_network`)."""

    name: str
    accuracy: dict[str, Any]
    auc: pd.DataFrame
    similarity: pd.DataFrame
    similarity_summary: dict[str, float]
    branch_similarity: pd.DataFrame
    correlation: pd.DataFrame
    importance: pd.DataFrame | None
    top_images: pd.DataFrame
    dissection: pd.DataFrame | None
    skipped_updates: int


def evaluate_network(finetuned: Finetuned, layer: str, tree: ConceptTree, train_concepts: ConceptSets,
                     eval_concepts: ConceptSets, task: TaskData, root: str | Path, settings: CWSettings, *, batch_size: int,
                     dissection: DissectionConfig | None = None, importance: bool = True, seed: int = 0,
                     device: str | torch.device | None = None) -> Evaluation:
    """The notebook's measurements on `layer` of one fine-tuned network: val accuracy (and per class),
    purity AUC per node over `settings.folds` folds of the val crops (CW: the node's own axis; BN: the
    unit with the best AUC on the train crops, CW's "best filter" baseline), the normalised similarity
    matrix Q of the leaves ordered by the tree, on the concept axes' spatial means (over all channels a
    cosine would not depend on the rotation), with its within/across-branch summary, the absolute
    correlation of the axes, concept importance by permutation (`importance`), the top images of every
    axis on the val split, and the dissection label of every axis (`dissection`)."""
    device = resolve_device(device)
    model = finetuned.model.to(device)
    read = read_layer(finetuned, layer)
    labels, logits = predict(model, task.val, batch_size=batch_size, device=device)
    correct = (logits.argmax(1) == labels).double()
    per_class = [100 * float(correct[labels == c].mean()) for c in range(len(task.classes))]
    val_maps = metrics.layer_outputs(model, read, eval_concepts.images, batch_size=batch_size, device=device)
    val_scores = metrics.axis_scores(val_maps, settings.mode)
    if read.endswith(".rotated"):
        axes = list(range(len(tree.nodes)))
    else:
        train_maps = metrics.layer_outputs(model, read, train_concepts.images, batch_size=batch_size, device=device)
        axes = metrics.best_units(metrics.axis_scores(train_maps, settings.mode), train_concepts, tree)
    auc = metrics.purity_auc(val_scores, eval_concepts, tree, axes, folds=settings.folds, seed=seed)
    q = metrics.similarity_matrix(val_maps.mean((2, 3))[:, axes], eval_concepts, tree)  # the concept axes only
    images = task.val.images
    image_scores = metrics.axis_scores(metrics.layer_outputs(model, read, images, batch_size=batch_size, device=device),
                                       settings.mode)[:, axes]
    top = metrics.top_images(image_scores, tree, k=settings.top_k)
    correlation = metrics.axis_correlation(image_scores, tree)
    ranked = None
    if importance:
        chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:settings.importance_images]
        ranked = metrics.concept_importance(model, read, images[chosen], labels[chosen], axes, tree, batch_size=batch_size,
                                            seed=seed, permutations=settings.importance_permutations, device=device)
    labels_table = None
    if dissection is not None:
        broden = BrodenDataset(Path(root), split=dissection.split)
        result = dissect(model, read, broden, categories=["object"], device=device, **dissection.dissect_keywords())
        labels_table = metrics.axis_labels(result.units, axes, tree)
    cw = [m for m in model.modules() if isinstance(m, ConceptWhitening)]
    return Evaluation(finetuned.name, {"accuracy": 100 * float(correct.mean()), "per_class": per_class},
                      auc, q, metrics.similarity_summary(q, tree), metrics.branch_similarity(q, tree), correlation,
                      ranked, top, labels_table, int(sum(int(m.skipped_updates) for m in cw)))


@dataclass
class Study:
    """Every fine-tuned network and its evaluation, with the long tables over them."""

    finetuned: dict[str, Finetuned]
    evaluations: dict[str, Evaluation]
    runs: pd.DataFrame
    auc: pd.DataFrame
    per_class: pd.DataFrame
    branches: pd.DataFrame
    rotations: dict[tuple[str, int, str], tuple[torch.Tensor, int, int]]
    alignment_trace: pd.DataFrame


def alignment_trace(finetuned: Finetuned, interval: int) -> pd.DataFrame:
    """Every rotation update of every CW layer of a fine-tuned network: one row per Cayley step with the
    objective F = <G, R> before and after it (lower is better aligned; G is that update's accumulated
    gradient), the accepted step size τ, the bisections, whether it was accepted, and `skipped` (the
    update changed nothing: G not finite or the line search failed); `train_step` = update x `interval`."""
    frames = []
    for layer in finetuned.layers:
        trace = pd.DataFrame(get_module(finetuned.model, layer).trace.cpu().numpy(), columns=list(TRACE_COLUMNS))
        trace = trace.astype({"update": int, "cayley_step": int, "bisections": int}).assign(accepted=trace.accepted > 0)
        skipped = trace.groupby("update").accepted.transform(lambda a: not a.all()) | (trace.cayley_step == 0)
        frames.append(trace.assign(skipped=skipped, train_step=trace["update"] * interval, layer=layer,
                                   name=finetuned.name, network=finetuned.network, seed=finetuned.seed,
                                   variant=finetuned.variant, cw_layers=len(finetuned.layers), placement=finetuned.placement))
    return pd.concat(frames, ignore_index=True)


def run_study(settings: CWSettings, subjects_: Mapping[tuple[str, int], Subject], tree: ConceptTree,
              train_concepts: ConceptSets, eval_concepts: ConceptSets, root: str | Path, *,
              batch_size: int, dissection: DissectionConfig | None, device: str | torch.device | None = None) -> Study:
    """Every subject fine-tuned with every variant at its layer (and, for the hierarchical variant, also
    alone at its second layer and at both layers at once: `placement`), then evaluated (`evaluate_network`;
    importance and the dissection on each network's first seed). `train_concepts` (train split) choose
    the BN baseline's best units, `eval_concepts` (val split) score every axis."""
    task = TaskData.load(root)
    finetuned, evaluations, rows, aucs, classes, branches, rotations, traces = {}, {}, [], [], [], [], {}, []
    jobs = [(s, v, (settings.layers[s.network],), MAIN) for s in subjects_.values() for v in settings.variants]
    for placement in (SECOND_DEPTH, TWO_DEPTHS):
        jobs += [(s, "ancestor", (settings.second_layers[s.network],) + ((settings.layers[s.network],) if placement == TWO_DEPTHS else ()),
                  placement) for s in subjects_.values() if s.network in settings.second_layers and "ancestor" in settings.variants]
    first_seed = {}
    for subject in subjects_.values():
        first_seed.setdefault(subject.network, subject.seed)
    for subject, variant, layers, placement in progress(jobs, desc="fine-tune and evaluate"):
        run = finetune(subject, variant, layers, settings, tree, train_concepts, task, placement=placement, device=device)
        finetuned[run.name] = run
        if variant != "bn":
            traces.append(alignment_trace(run, settings.interval))
        if variant != "bn" and placement == MAIN:
            cw = get_module(run.model, layers[0])
            rotations[subject.network, subject.seed, variant] = (cw.running_rot.detach().cpu().clone(), int(cw.updates),
                                                                 int(cw.skipped_updates))
        first = subject.seed == first_seed[subject.network]
        for layer in layers:
            name = run.name if len(layers) == 1 else f"{run.name}@{layer}"
            evaluation = evaluate_network(run, layer, tree, train_concepts, eval_concepts,
                                          task, root, settings, batch_size=batch_size, importance=first and placement == MAIN,
                                          dissection=dissection if first and settings.dissect_axes else None,
                                          seed=subject.seed, device=device)
            evaluations[name] = evaluation
            base = {"name": name, "network": subject.network, "seed": subject.seed, "variant": variant,
                    "cw_layers": len(layers), "placement": placement, "layer": layer}
            rows.append({**base, "start_val_acc": subject.val_accuracy, "val_acc": evaluation.accuracy["accuracy"],
                         "epochs": len(run.history), "minutes": float(run.history["seconds"].sum()) / 60,
                         "mean_auc": float(evaluation.auc.auc.mean()), **evaluation.similarity_summary,
                         "mean_abs_correlation": metrics.mean_off_diagonal(evaluation.correlation),
                         "skipped_updates": evaluation.skipped_updates})
            aucs.append(evaluation.auc.assign(**base))
            branches.append(evaluation.branch_similarity.assign(**base))
            classes.append(pd.DataFrame({"class_id": range(len(evaluation.accuracy["per_class"])),
                                         "accuracy": evaluation.accuracy["per_class"]}).assign(**base))
    return Study(finetuned, evaluations, pd.DataFrame(rows), pd.concat(aucs, ignore_index=True),
                 pd.concat(classes, ignore_index=True), pd.concat(branches, ignore_index=True), rotations,
                 pd.concat(traces, ignore_index=True) if traces else pd.DataFrame())


def dissection_table(study: Study) -> pd.DataFrame:
    """Experiment 4: per dissected run and node, its axis's dissection label (best object) and IoU, and
    whether the label lies in the node's subtree (ConceptWorld's tree is known exactly)."""
    frames = [e.dissection.assign(name=name) for name, e in study.evaluations.items() if e.dissection is not None]
    if not frames:
        return pd.DataFrame(columns=["name", "node", "depth", "axis", "label", "iou", "matches"])
    runs = study.runs.set_index("name")[["network", "variant", "layer", "cw_layers", "placement"]]
    return pd.concat(frames, ignore_index=True).join(runs, on="name")


def importance_table(study: Study) -> pd.DataFrame:
    """Concept importance (CE ratio after permuting an axis) per run evaluated with it, one row per node."""
    frames = [e.importance.assign(name=name) for name, e in study.evaluations.items() if e.importance is not None]
    return pd.concat(frames, ignore_index=True).join(study.runs.set_index("name")[["network", "variant"]], on="name")
