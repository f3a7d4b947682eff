"""Classifiers trained on a ConceptWorld (or ImageFolder) task, shared by every notebook via the cache.

Notebooks 00, 03 and 05 train the same kinds of baselines; going through `train_world_classifier`
with the same configuration returns the cached model instead of training it again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from replication.data.classification import ClassificationDataset
from replication.data.subsets import InMemoryDataset, seeded_indices
from replication.models.backbones import BackboneConfig
from replication.training.loop import Recipe, TrainConfig, TrainResult, predict, train_cached

PLATEAU_EPOCHS = 5  # a learning curve has plateaued when its last 5 val accuracies lie within PLATEAU_POINTS
PLATEAU_POINTS = 2.0
TUNING_COLUMNS = ["arch", "candidate", "tuning_acc", "train_acc", "epochs", "minutes", "chosen"]
NO_HISTORY = ["epoch", "train_acc", "val_acc"]  # the empty learning curve of a network loaded, not trained


@dataclass(frozen=True)
class RecipeSearch:
    """How notebook 00 chooses the baselines' training recipe [I] (the table [baselines.recipe_search]).

    Each candidate (name -> `TrainConfig` fields over the profile's [train]) trains every arch once
    with `tuning_seed` (never a reported seed) on the train split minus a seeded `tuning_fraction`,
    and is scored on that held-out part; the val split, whose numbers are reported, is never used.
    Per arch, the recipe with the highest tuning accuracy wins; candidates within `tie_points` of the
    best tie and the first listed of them wins (list cheaper recipes first). No candidates: [train].
    """

    candidates: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    tuning_seed: int = 100
    tuning_fraction: float = 0.2
    tie_points: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.tuning_fraction < 1:
            raise ValueError(f"[baselines.recipe_search] tuning_fraction = {self.tuning_fraction}: give a share in (0, 1).")
        known = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
        for name, overrides in self.candidates.items():
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"[baselines.recipe_search] candidate {name!r} sets {unknown}, which are no TrainConfig "
                                 f"fields (the seed is the tuning seed); known: {sorted(known)}.")


@dataclass(frozen=True)
class BaselineSettings:
    """Notebook 00's [baselines] section: the backbones trained from scratch on the world's task
    (`archs`, each the profile's [model] with `model_overrides[arch]` applied; one whose overrides give
    `weights` is loaded from that file instead), `data_root` (class folders: real data, see
    `replication.data.sources`), the `layers` of each
    arch dissected across depth, the rotation study's `rotation_layers` (arch -> the layer rotated, one
    of its `layers`), `rotation_alphas` and `rotation_seed`, how their training recipe is chosen
    (`recipe_search`), and the `pretrained` networks (names of `models.pretrained.PRETRAINED`, each with
    its `layers`) dissected next to them as they are."""

    archs: tuple[str, ...]
    layers: Mapping[str, Sequence[str]]
    rotation_layers: Mapping[str, str]
    rotation_alphas: tuple[float, ...]
    rotation_seed: int = 0
    model_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recipe_search: RecipeSearch = RecipeSearch()
    pretrained: tuple[str, ...] = ()
    data_root: str | None = None

    def __post_init__(self) -> None:
        missing = [arch for arch in (*self.archs, *self.pretrained) if arch not in self.layers]
        if missing:
            raise ValueError(f"[baselines] layers lists no layers for {missing}; add layers.<arch> = [...] for each arch.")
        for arch, layer in self.rotation_layers.items():
            if arch not in self.archs or layer not in self.layers[arch]:
                raise ValueError(f"[baselines] rotation_layers.{arch} = {layer!r}: give one of the dissected layers of an "
                                 f"arch in archs ({dict(self.layers)}).")


@dataclass(frozen=True)
class ClassifierRecipe(Recipe):
    """A `BackboneConfig` network with `num_classes` outputs trained on the task loss alone."""

    model: BackboneConfig
    num_classes: int

    def build(self) -> nn.Module:
        return self.model.build(self.num_classes)

    def key(self, model: nn.Module) -> dict[str, Any]:
        return {"model": self.model, "loss": None}


def train_world_classifier(
    root: str | Path,
    model: BackboneConfig,
    config: TrainConfig,
    *,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train (or load from the cache) `model` on the dataset at `root`, validating on its val split
    (both decoded once into memory: a PNG decode per image and epoch would dominate small models)."""
    train_set = ClassificationDataset(root, "train")
    recipe = ClassifierRecipe(model, len(train_set.classes))
    return train_cached("classifier", recipe, InMemoryDataset(train_set), config=config,
                        val_set=InMemoryDataset(ClassificationDataset(root, "val")), device=device)


def select_recipe(root: str | Path, model: BackboneConfig, train: TrainConfig, search: RecipeSearch, *,
                  device: str | torch.device | None = None) -> tuple[TrainConfig, pd.DataFrame]:
    """The training recipe for `model` chosen by `search`'s rule (see `RecipeSearch`), and one row per
    candidate: tuning accuracy (last epoch), train accuracy, epochs, minutes, chosen. Trained through
    the cache (kind "recipe_tuning"), so the search runs once per world, arch and candidate."""
    if not search.candidates:
        return train, pd.DataFrame(columns=TUNING_COLUMNS)
    split = ClassificationDataset(root, "train")
    tuning = seeded_indices(len(split), round(search.tuning_fraction * len(split)), seed=search.tuning_seed) or []
    held_out = set(tuning)
    fit = InMemoryDataset(split, [i for i in range(len(split)) if i not in held_out])
    score = InMemoryDataset(split, tuning)
    recipe = ClassifierRecipe(model, len(split.classes))
    configs, rows = {}, []
    for name, overrides in search.candidates.items():
        configs[name] = dataclasses.replace(train, **overrides)
        history = train_cached("recipe_tuning", recipe, fit, config=dataclasses.replace(configs[name], seed=search.tuning_seed),
                               val_set=score, device=device).history
        rows.append({"arch": model.arch, "candidate": name, "tuning_acc": 100 * float(history["val_acc"].iloc[-1]),
                     "train_acc": 100 * float(history["train_acc"].iloc[-1]), "epochs": len(history),
                     "minutes": float(history["seconds"].sum()) / 60})
    table = pd.DataFrame(rows)
    best = table["tuning_acc"].max()
    chosen = table.loc[table["tuning_acc"] >= best - search.tie_points, "candidate"].iloc[0]
    table["chosen"] = table["candidate"] == chosen
    return configs[chosen], table


def accuracy_report(model: nn.Module, dataset: ClassificationDataset, *, batch_size: int,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """What a trained classifier gets right on `dataset`: `accuracy`, `within_scene_accuracy` (the
    arg max over the classes that share the true class's scene: the task left once the scene is known;
    NaN without scene rules), `per_class` (accuracy per class id) and `confusion` (true x predicted counts)."""
    labels, logits = predict(model, dataset, batch_size=batch_size, device=device)
    predicted = logits.argmax(1)
    k = logits.shape[1]
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    scenes = [rule.get("scene") for rule in dataset.rules]
    within = float("nan")
    if all(scenes):
        same_scene = torch.tensor([[a == b for b in scenes] for a in scenes])[labels]
        within = float((logits.masked_fill(~same_scene, -torch.inf).argmax(1) == labels).float().mean())
    totals = confusion.sum(1)
    per_class = np.divide(np.diag(confusion), totals, out=np.full(k, np.nan), where=totals > 0)
    return {"accuracy": float((predicted == labels).float().mean()), "within_scene_accuracy": within,
            "per_class": per_class, "confusion": confusion}


def plateaued(history: pd.DataFrame) -> bool:
    """Whether a learning curve has levelled off: the last `PLATEAU_EPOCHS` val accuracies lie within
    `PLATEAU_POINTS` points of each other [I]."""
    tail = 100 * history["val_acc"].tail(PLATEAU_EPOCHS)
    return len(tail) == PLATEAU_EPOCHS and float(tail.max() - tail.min()) <= PLATEAU_POINTS


@dataclass
class Baselines:
    """Notebook 00's trained baselines: `models[arch, seed]`, their val `reports[arch, seed]`
    (`accuracy_report`), `accuracy` (one row per run: epochs, train/val/within-scene accuracy in %,
    plateaued), `histories` (one row per run and epoch), the chosen `recipes[arch]` and the recipe
    search's `tuning` table."""

    models: dict[tuple[str, int], nn.Module]
    reports: dict[tuple[str, int], dict[str, Any]]
    accuracy: pd.DataFrame
    histories: pd.DataFrame
    recipes: dict[str, TrainConfig]
    tuning: pd.DataFrame

    def per_class(self, class_names: Sequence[str]) -> pd.DataFrame:
        """Val accuracy (%) per class (rows, by class id) and arch (columns), mean over seeds."""
        frame = pd.DataFrame({key: 100 * report["per_class"] for key, report in self.reports.items()}, index=list(class_names))
        return frame.T.groupby(level=0, sort=False).mean().T.rename_axis("class")


def train_baselines(
    root: str | Path,
    settings: BaselineSettings,
    *,
    model: BackboneConfig,
    train: TrainConfig,
    seeds: Sequence[int],
    batch_size: int,
    device: str | torch.device | None = None,
) -> Baselines:
    """Every arch of `settings` x every seed trained (or loaded from the cache) on the world at `root`.

    `model` and `train` are the profile's [model] and [train] sections; each arch gets its
    `model_overrides`, its recipe from `select_recipe` (the [train] section without candidates) and
    each run its seed. An arch whose config has `weights` is that file's network, loaded and not trained
    (no recipe, no learning curve, 0 epochs, train accuracy NaN), one run under the first seed: a seed
    cannot replicate a network nobody trains here. Each
    model is then scored on the val split (`accuracy_report`).
    """
    val_set = ClassificationDataset(root, "val")
    models, reports, rows, histories, recipes, tuning = {}, {}, [], [], {}, []
    for arch in settings.archs:
        arch_config = dataclasses.replace(model, arch=arch, **settings.model_overrides.get(arch, {}))
        if arch_config.weights:
            loaded = TrainResult(_load_pretrained(arch_config, len(val_set.classes), device), pd.DataFrame(columns=NO_HISTORY))
        else:
            recipes[arch], table = select_recipe(root, arch_config, train, settings.recipe_search, device=device)
            tuning.append(table)
        for seed in seeds[:1] if arch_config.weights else seeds:  # a loaded network is one network, not one per seed
            result = loaded if arch_config.weights else train_world_classifier(
                root, arch_config, dataclasses.replace(recipes[arch], seed=seed), device=device)
            models[arch, seed] = result.model
            reports[arch, seed] = report = accuracy_report(result.model, val_set, batch_size=batch_size, device=device)
            epochs, train_acc = (int(result.history["epoch"].iloc[-1]), 100 * result.history["train_acc"].iloc[-1]) \
                if len(result.history) else (0, float("nan"))
            rows.append({"arch": arch, "seed": seed, "epochs": epochs, "train_acc": train_acc,
                         "val_acc": 100 * report["accuracy"], "within_scene_acc": 100 * report["within_scene_accuracy"],
                         "plateaued": plateaued(result.history)})
            histories.append(result.history.assign(arch=arch, seed=seed))
    return Baselines(models, reports, pd.DataFrame(rows), pd.concat(histories, ignore_index=True), recipes,
                     pd.concat(tuning, ignore_index=True) if tuning else pd.DataFrame(columns=TUNING_COLUMNS))


def _load_pretrained(config: BackboneConfig, num_classes: int, device: str | torch.device | None) -> nn.Module:
    """`config`'s network with its `weights` file loaded, in eval mode on `device`; the file must have
    one output per class folder."""
    try:
        network = config.build(num_classes)
    except ValueError as error:
        raise ValueError(f"{config.arch}: the class folders hold {num_classes} classes; {error}") from None
    return network.to(device).eval()
