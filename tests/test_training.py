"""Training loop: determinism, bit-exact resume after a kill, loss-term plumbing, evaluation, cache."""
from __future__ import annotations

import copy
import math
import random
import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from replication import cache, io
from replication.models.backbones import BackboneConfig
from replication.training import loop
from replication.data.classification import ClassificationDataset
from replication.training import classifiers
from replication.training.classifiers import (BaselineSettings, RecipeSearch, accuracy_report, plateaued, select_recipe,
                                              train_baselines, train_world_classifier)
from replication.training.loop import TrainConfig, evaluate, train, train_cached
from tests.helpers import assert_close

CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.1, seed=3)
VOLATILE = ["seconds"]


def make_data(n: int = 32, seed: int = 0) -> TensorDataset:
    """Three classes told apart by which colour channel is brightest."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, 3, 6, 6, generator=g)
    images[torch.arange(n), labels] += 0.5
    return TensorDataset(images, labels)


def make_model(seed: int = 0) -> nn.Module:
    """Conv, BN (running statistics) and dropout (RNG), so resume must restore all of them."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(4, 3),
    )


@dataclass(frozen=True)
class RandomChannelPenalty:
    """A loss term reading an activation and Python's RNG (as CGL's pair sampling does)."""

    name: str = "channel"
    layers: tuple[str, ...] = ("0",)
    weight: float = 0.01

    def __call__(self, model, activations):
        channel = random.randrange(activations["0"].shape[1])
        return self.weight * activations["0"][:, channel].pow(2).mean()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    assert_same_state_dicts(a.state_dict(), b.state_dict())


def assert_same_state_dicts(sa: dict, sb: dict) -> None:
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different}"


def assert_same_history(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.drop(columns=VOLATILE), b.drop(columns=VOLATILE), check_exact=True)


def run(checkpoint_dir=None, *, model_seed=0, data=None, config=CONFIG, terms=(RandomChannelPenalty(),), callbacks=()):
    return train(
        make_model(model_seed), data or make_data(), config=config, val_set=make_data(12, seed=1),
        loss_terms=terms, step_callbacks=callbacks, device="cpu", checkpoint_dir=checkpoint_dir,
    )


def test_same_seed_gives_identical_weights_and_metrics():
    first, second = run(), run()
    assert_same_state(first.model, second.model)
    assert_same_history(first.history, second.history)
    assert list(first.history.columns) == [
        "epoch", "train_loss", "loss_channel", "train_acc", "val_loss", "val_acc", "lr", "seconds", "seed"
    ]
    assert first.history["epoch"].tolist() == [1, 2] and (first.history["seed"] == 3).all()
    other = run(config=TrainConfig(epochs=2, batch_size=8, lr=0.1, seed=4))
    assert not torch.equal(first.model[6].weight, other.model[6].weight)


class KilledAfter(Dataset):
    """Serves `data` until `limit` items have been read, then dies as a killed process would."""

    def __init__(self, data: Dataset, limit: int):
        self.data, self.limit, self.reads = data, limit, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.limit:
            raise KeyboardInterrupt("killed")
        return self.data[index]


def test_resume_after_kill_mid_epoch_is_bit_exact(tmp_path):
    reference = run(tmp_path / "reference")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", data=KilledAfter(make_data(), limit=32 + 13))  # mid epoch 2
    saved = io.load_torch(tmp_path / "killed" / loop.CHECKPOINT_NAME)
    assert len(saved["history"]) == 1
    # a fresh process would rebuild the model with other initial weights: the checkpoint must win
    resumed = run(tmp_path / "killed", model_seed=99)
    assert_same_state(resumed.model, reference.model)
    assert_same_history(resumed.history, reference.history)
    assert_same_history(pd.read_csv(tmp_path / "killed" / loop.HISTORY_NAME), pd.read_csv(tmp_path / "reference" / loop.HISTORY_NAME))


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    reference = run()
    real_save, saves = torch.save, []

    def dies_on_second_save(obj, handle, *args, **kwargs):
        saves.append(handle)
        if len(saves) == 2:
            handle.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([loop.CHECKPOINT_NAME, loop.HISTORY_NAME])
    assert len(io.load_torch(tmp_path / loop.CHECKPOINT_NAME)["history"]) == 1
    resumed = run(tmp_path, model_seed=99)
    assert_same_state(resumed.model, reference.model)
    assert_same_history(resumed.history, reference.history)


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    one_epoch = TrainConfig(epochs=1, batch_size=8, lr=0.1, seed=3)
    first = run(tmp_path, config=one_epoch)
    with pytest.raises(ValueError, match="written by a different run"):
        run(tmp_path)
    with pytest.raises(ValueError, match="written by a different run"):
        run(tmp_path, config=one_epoch, terms=[RandomChannelPenalty(weight=0.5)])
    # the same run again is already finished: its history (timings included) comes from the checkpoint
    pd.testing.assert_frame_equal(run(tmp_path, config=one_epoch).history, first.history, check_exact=True)


@dataclass(frozen=True)
class SquaredOutput:
    """weight · mean(fc output²), with the fc layer exempt from weight decay."""

    name: str = "squared"
    layers: tuple[str, ...] = ("1",)
    weight: float = 0.5

    def __call__(self, model, activations):
        return self.weight * activations["1"].pow(2).mean()

    def decay_free_parameters(self, model):
        return list(model[1].parameters())


def test_one_step_matches_a_hand_computed_sgd_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3))
    data = make_data(16)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.2, momentum=0.0, weight_decay=0.1, schedule="none")
    expected = copy.deepcopy(model)
    images, labels = data.tensors
    logits = expected(images)
    task = nn.functional.cross_entropy(logits, labels)
    term = 0.5 * logits.pow(2).mean()
    (task + term).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p -= config.lr * p.grad  # the term's decay_free_parameters: no weight decay on fc
    result = train(model, data, config=config, loss_terms=[SquaredOutput()], device="cpu")
    for got, want in zip(result.model.parameters(), expected.parameters()):
        assert_close(got, want, atol=1e-6)
    row = result.history.iloc[0]
    assert_close(row["train_loss"], task.item(), atol=1e-6)
    assert_close(row["loss_squared"], term.item(), atol=1e-6)
    assert row["train_acc"] == (logits.argmax(1) == labels).float().mean().item()
    assert row["lr"] == 0.2 and math.isnan(row["val_loss"])


class RecordSteps:
    """Records each call's step, epoch and whether autograd was on (state kept outside the model:
    fine for inspecting one run, not for a callback that must survive a resume)."""

    name = "record"

    def __init__(self):
        self.calls = []

    def __call__(self, model, *, step, epoch):
        self.calls.append((step, epoch, torch.is_grad_enabled()))


@dataclass(frozen=True)
class ZeroBiasEvery:
    """A toy periodic update (as concept whitening rotates every k steps): zero the classifier's bias
    after every `every`-th optimiser step."""

    name: str = "zero_bias"
    every: int = 2

    def __call__(self, model, *, step, epoch):
        if step % self.every == 0:
            model[6].bias.zero_()


def test_step_callbacks_run_after_every_step_without_autograd():
    record = RecordSteps()
    run(callbacks=[record])  # 32 images in batches of 8: 4 steps per epoch, 2 epochs
    assert record.calls == [(step, 1 + (step > 4), False) for step in range(1, 9)]


def test_step_callback_changes_the_model_after_its_steps():
    plain = run()
    every_second = run(callbacks=[ZeroBiasEvery(every=2)])  # step 8, the last, zeroes the bias
    every_third = run(callbacks=[ZeroBiasEvery(every=3)])  # zeroed after step 6, then two more updates
    assert torch.equal(every_second.model[6].bias, torch.zeros(3))
    assert not torch.equal(every_third.model[6].bias, torch.zeros(3))
    assert not torch.equal(every_third.model[6].weight, plain.model[6].weight)
    assert_same_state(run(callbacks=[ZeroBiasEvery(every=3)]).model, every_third.model)


def test_resume_with_a_step_callback_is_bit_exact(tmp_path):
    callbacks = [ZeroBiasEvery(every=3)]
    reference = run(tmp_path / "reference", callbacks=callbacks)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", data=KilledAfter(make_data(), limit=32 + 13), callbacks=callbacks)
    resumed = run(tmp_path / "killed", model_seed=99, callbacks=callbacks)
    assert_same_state(resumed.model, reference.model)
    assert_same_history(resumed.history, reference.history)


def test_step_callbacks_are_part_of_the_checkpoint_and_cache_identity(tmp_path, monkeypatch):
    one_epoch = TrainConfig(epochs=1, batch_size=8, lr=0.1, seed=3)
    run(tmp_path / "run", config=one_epoch, callbacks=[ZeroBiasEvery(every=2)])
    for callbacks in ([ZeroBiasEvery(every=3)], []):
        with pytest.raises(ValueError, match="written by a different run"):
            run(tmp_path / "run", config=one_epoch, callbacks=callbacks)

    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path / "cache"))
    for callbacks in ((), (ZeroBiasEvery(every=2),)):
        train_cached("tiny", TinyRecipe(callbacks=callbacks), make_data(), config=one_epoch, device="cpu")
    recorded = [io.read_json(folder / cache.DONE_MARKER)["config"].get("step_callbacks")
                for folder in (tmp_path / "cache" / "tiny").iterdir()]
    assert sorted(recorded, key=str) == [None, [{"type": "ZeroBiasEvery", "name": "zero_bias", "every": 2}]]


def test_an_object_that_is_no_step_callback_is_refused():
    with pytest.raises(TypeError, match="lacks `name` or `__call__`"):
        run(callbacks=[lambda model, step, epoch: None])


def test_evaluate_known_answer():
    # the model passes its input through: each "image" is a row of logits
    logits = torch.log(torch.tensor([[1.0, 3.0], [1.0, 3.0], [3.0, 1.0], [1.0, 1.0]]))
    labels = torch.tensor([1, 0, 0, 1])
    metrics = evaluate(nn.Identity(), TensorDataset(logits, labels), batch_size=3, device="cpu")
    expected_loss = -(math.log(0.75) + math.log(0.25) + math.log(0.75) + math.log(0.5)) / 4
    assert_close(metrics["loss"], expected_loss, atol=1e-6)
    assert metrics["accuracy"] == 0.5  # argmax of the tie [1, 1] is class 0 -> wrong
    assert metrics["n"] == 4


def test_bad_input_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        TrainConfig(epochs=1, batch_size=8, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="amp=True needs CUDA"):
        run(config=TrainConfig(epochs=1, batch_size=8, lr=0.1, amp=True))
    with pytest.raises(ValueError, match="unknown layer 'head'"):
        run(terms=[RandomChannelPenalty(layers=("head",))])

    @dataclass(frozen=True)
    class PerSample:
        name: str = "per_sample"
        layers: tuple[str, ...] = ("0",)

        def __call__(self, model, activations):
            return activations["0"].mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match="must return a scalar tensor"):
        run(terms=[PerSample()])


@dataclass(frozen=True)
class TinyRecipe(loop.Recipe):
    """`make_model` with the given loss terms and step callbacks; the key lists them like dataclass terms."""

    model_seed: int = 0
    terms: tuple = (RandomChannelPenalty(),)
    callbacks: tuple = ()

    def build(self):
        return make_model(self.model_seed)

    def loss_terms(self, model):
        return self.terms

    def step_callbacks(self, model):
        return self.callbacks

    def key(self, model):
        return {"model": {"arch": "tiny"}, "loss": [cache.canonical(t) for t in self.terms]}


def unseeded_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 3))


@dataclass(frozen=True)
class UnseededRecipe(loop.Recipe):
    """Builds from the global RNG as train_cached leaves it, so its weights show where seeding happens."""

    def build(self):
        return unseeded_model()

    def key(self, model):
        return {"model": {"arch": "unseeded"}, "loss": None}


def test_train_cached_loads_a_finished_model_instead_of_retraining(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    arguments = dict(config=CONFIG, val_set=make_data(12, seed=1), device="cpu")
    first = train_cached("tiny", TinyRecipe(model_seed=0), make_data(), **arguments)
    (folder,) = (tmp_path / "tiny").iterdir()
    assert cache.is_done(folder) and not (folder / "checkpoints").exists()

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a cached model was retrained"))
    again = train_cached("tiny", TinyRecipe(model_seed=7), make_data(), **arguments)
    assert_same_state(again.model, first.model)
    assert_close(again.history.drop(columns=VOLATILE).to_numpy(), first.history.drop(columns=VOLATILE).to_numpy(), atol=1e-12)

    # other data -> another cache entry (so the guard above fires)
    with pytest.raises(pytest.fail.Exception, match="retrained"):
        train_cached("tiny", TinyRecipe(model_seed=0), make_data(seed=5), **arguments)


def test_train_cached_key_is_the_recipe_key_plus_training_data_and_compute(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    data, val = make_data(), make_data(12, seed=1)
    train_cached("tiny", TinyRecipe(model_seed=0), data, config=CONFIG, val_set=val, device="cpu")
    expected = {"model": {"arch": "tiny"}, "loss": [{"name": "channel", "layers": ["0"], "weight": 0.01}], "train": CONFIG,
                "train_data": loop.dataset_fingerprint(data), "val_data": loop.dataset_fingerprint(val),
                "device_type": "cpu", "cpu_threads": torch.get_num_threads()}
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [cache.config_hash(expected)]


def test_train_cached_builds_the_model_right_after_seeding(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    initial = {}

    def stop(model, *args, **kwargs):
        initial["state"] = copy.deepcopy(model.state_dict())
        raise KeyboardInterrupt("stopped before training")

    monkeypatch.setattr(loop, "train", stop)
    torch.manual_seed(123)  # whatever the RNG held before must not matter
    with pytest.raises(KeyboardInterrupt):
        train_cached("tiny", UnseededRecipe(), make_data(), config=CONFIG, device="cpu")
    torch.manual_seed(CONFIG.seed)
    assert_same_state_dicts(initial["state"], unseeded_model().state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_on_cuda_trains_and_evaluates():
    config = TrainConfig(epochs=2, batch_size=8, lr=0.1, amp=True)
    result = train(make_model(), make_data(), config=config, val_set=make_data(12, seed=1), loss_terms=[RandomChannelPenalty()], device="cuda")
    assert result.history[["train_loss", "loss_channel", "val_loss"]].notna().all().all()
    assert next(result.model.parameters()).device.type == "cuda"


def test_progress_bars_do_not_change_training(monkeypatch):
    """A bar must never iterate the loader: an extra iterator draws from the shuffling generators."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("REPLICATION_QUIET", raising=False)
    with_bars = run()
    monkeypatch.setenv("REPLICATION_QUIET", "1")
    quiet = run()
    assert_same_state(with_bars.model, quiet.model)


def test_cpu_thread_count_is_part_of_the_cache_key(tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1)
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            train_cached("tiny", TinyRecipe(terms=()), make_data(), config=config, device="cpu")
    finally:
        torch.set_num_threads(threads)
    recorded = sorted(io.read_json(folder / cache.DONE_MARKER)["config"]["cpu_threads"] for folder in (tmp_path / "tiny").iterdir())
    assert recorded == [1, 2]


@pytest.mark.parametrize("field, value", [("epochs", 1.5), ("batch_size", 8.0), ("seed", "0"), ("epochs", True)])
def test_train_config_refuses_non_integer_counts(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be an integer"):
        TrainConfig(**{"epochs": 1, "batch_size": 8, "lr": 0.1, field: value})


def test_a_label_outside_the_models_classes_is_named():
    data = make_data()
    data.tensors[1][5] = 7
    with pytest.raises(ValueError, match=r"class id\(s\) \[7\] out of range for a model with 3 outputs"):
        run(data=data)


def test_train_baselines_trains_every_arch_and_seed_through_the_cache(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    settings = BaselineSettings(archs=("resnet18", "alexnet"), layers={"resnet18": ["layer4"], "alexnet": ["features.0"]},
                                rotation_layers={"resnet18": "layer4"}, rotation_alphas=(0.0,),
                                model_overrides={"alexnet": {"width": 0.0625}})
    model, config = BackboneConfig(small_input=True, width=0.125), TrainConfig(epochs=1, batch_size=8, lr=0.01)
    baselines = train_baselines(tiny_world, settings, model=model, train=config, seeds=(0, 1), batch_size=4, device="cpu")
    models, accuracy = baselines.models, baselines.accuracy
    assert list(models) == [("resnet18", 0), ("resnet18", 1), ("alexnet", 0), ("alexnet", 1)]
    assert accuracy[["arch", "seed", "epochs"]].values.tolist() == [["resnet18", 0, 1], ["resnet18", 1, 1], ["alexnet", 0, 1], ["alexnet", 1, 1]]
    assert accuracy[["train_acc", "val_acc", "within_scene_acc"]].stack().between(0, 100).all()
    assert not accuracy["plateaued"].any()  # one epoch is no plateau
    assert baselines.recipes == {"resnet18": config, "alexnet": config} and baselines.tuning.empty
    assert baselines.histories.groupby(["arch", "seed"]).size().tolist() == [1, 1, 1, 1]
    report = baselines.reports["alexnet", 1]
    assert report["confusion"].sum() == len(ClassificationDataset(tiny_world, "val"))
    assert accuracy["val_acc"].iloc[-1] == pytest.approx(100 * report["accuracy"])
    names = ClassificationDataset(tiny_world, "val").classes
    per_class = baselines.per_class(names)
    assert list(per_class.columns) == ["resnet18", "alexnet"] and list(per_class.index) == names
    expected = 50 * (baselines.reports["alexnet", 0]["per_class"] + report["per_class"])
    np.testing.assert_allclose(per_class["alexnet"].to_numpy(), expected)
    assert models["alexnet", 0].features[0].out_channels == 4  # 64 x the override's width 1/16
    assert not torch.equal(models["resnet18", 0].conv1.weight, models["resnet18", 1].conv1.weight)

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a cached baseline was retrained"))
    alone = train_world_classifier(tiny_world, BackboneConfig(arch="alexnet", small_input=True, width=0.0625),
                                   dataclasses.replace(config, seed=1), device="cpu")
    assert_same_state(alone.model, models["alexnet", 1])


def test_train_baselines_loads_an_arch_with_weights_and_trains_nothing(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path / "cache"))
    classes = len(ClassificationDataset(tiny_world, "val").classes)
    network = BackboneConfig(small_input=True, width=0.125).build(classes)
    weights = io.save_torch(tmp_path / "resnet18.pth", network.state_dict())
    settings = BaselineSettings(archs=("resnet18",), layers={"resnet18": ["layer4"]}, rotation_layers={"resnet18": "layer4"},
                                rotation_alphas=(0.0,), model_overrides={"resnet18": {"weights": str(weights)}},
                                recipe_search=RecipeSearch(candidates={"adam": {"optimizer": "adam"}}))
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a network with weights was trained"))
    model, config = BackboneConfig(small_input=True, width=0.125), TrainConfig(epochs=1, batch_size=8, lr=0.01)
    baselines = train_baselines(tiny_world, settings, model=model, train=config, seeds=(0, 1), batch_size=4, device="cpu")
    assert list(baselines.models) == [("resnet18", 0)]  # one loaded network, not a copy per seed
    assert_same_state(baselines.models["resnet18", 0], network)
    assert not baselines.models["resnet18", 0].training
    assert baselines.recipes == {} and baselines.tuning.empty and baselines.histories.empty
    accuracy = baselines.accuracy
    assert accuracy["epochs"].tolist() == [0] and accuracy["train_acc"].isna().all() and not accuracy["plateaued"].any()
    report = accuracy_report(network.eval(), ClassificationDataset(tiny_world, "val"), batch_size=4, device="cpu")
    assert accuracy["val_acc"].tolist() == [100 * report["accuracy"]]

    io.save_torch(weights, BackboneConfig(small_input=True, width=0.125).build(classes + 1).state_dict())
    with pytest.raises(ValueError, match=rf"resnet18: the class folders hold {classes} classes; weights in .* do not fit"):
        train_baselines(tiny_world, settings, model=model, train=config, seeds=(0,), batch_size=4, device="cpu")


def test_flip_crop_moves_and_mirrors_images_exactly():
    """With padding 0 only flips remain; with padding 1 a crop shifts by at most one pixel, filling zeros."""
    image = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3).repeat(64, 1, 1, 1)
    flipped = loop.flip_crop(image, torch.Generator().manual_seed(0), padding=0)
    is_flipped = (flipped == image.flip(-1)).flatten(1).all(1)
    assert ((flipped == image).flatten(1).all(1) | is_flipped).all() and 10 < int(is_flipped.sum()) < 54
    shifted = loop.flip_crop(image, torch.Generator().manual_seed(1), padding=1)
    padded = nn.functional.pad(image[:1], (1, 1, 1, 1))
    candidates = [padded[..., r:r + 3, c:c + 3] for r in range(3) for c in range(3)]
    candidates += [c.flip(-1) for c in candidates]
    assert all(any(torch.equal(s[None], c) for c in candidates) for s in shifted)
    again = loop.flip_crop(image, torch.Generator().manual_seed(1), padding=1)
    assert torch.equal(shifted, again)


def test_augmented_training_is_reproducible_and_resumes_bit_exact(tmp_path):
    """Augmentation draws from the epoch's own generator: two runs agree, a killed run resumes exactly,
    and the draws leave the shuffle order (the sampler's stream) untouched."""
    config = dataclasses.replace(CONFIG, augment="flip_crop", crop_padding=1)
    first, second = run(config=config), run(config=config)
    assert_same_state(first.model, second.model)
    assert not torch.equal(first.model[6].weight, run().model[6].weight)  # augmentation changes training
    reference = run(tmp_path / "reference", config=config)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", data=KilledAfter(make_data(), limit=32 + 13), config=config)
    assert_same_state(run(tmp_path / "killed", config=config, model_seed=99).model, reference.model)
    plain, augmented = loop._seed_epoch(3, 1), loop._seed_epoch(3, 1)
    loop.flip_crop(torch.zeros(8, 1, 4, 4), augmented.augment, padding=2)
    assert torch.equal(torch.randperm(10, generator=plain.sampler), torch.randperm(10, generator=augmented.sampler))
    with pytest.raises(ValueError, match="augment='mixup'"):
        TrainConfig(epochs=1, batch_size=2, lr=0.1, augment="mixup")
    with pytest.raises(ValueError, match="crop_padding must be >= 0"):
        TrainConfig(epochs=1, batch_size=2, lr=0.1, crop_padding=-1)


class FixedLogits(nn.Module):
    """Returns the logits stored for each image id (the image's first pixel)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


class RuledSet(TensorDataset):
    def __init__(self, labels, scenes):
        super().__init__(torch.arange(len(labels), dtype=torch.float32).reshape(-1, 1, 1, 1), torch.tensor(labels))
        self.rules = [{"scene": s} if s else {} for s in scenes]


def test_accuracy_report_known_answer():
    # classes 0, 1 in scene "a", class 2 in scene "b"; four images with true labels 0, 1, 2, 2
    logits = torch.tensor([[0.0, 1.0, 5.0],   # true 0: predicted 2 (wrong scene); within scene a: 1 (wrong)
                           [0.0, 1.0, 5.0],   # true 1: predicted 2; within scene a: 1 (right)
                           [0.0, 0.0, 1.0],   # true 2: right
                           [9.0, 0.0, 1.0]])  # true 2: predicted 0; within scene b: 2 (right)
    report = accuracy_report(FixedLogits(logits), RuledSet([0, 1, 2, 2], ["a", "a", "b"]), batch_size=3, device="cpu")
    assert report["accuracy"] == 0.25 and report["within_scene_accuracy"] == 0.75
    assert report["per_class"].tolist() == [0.0, 0.0, 0.5]
    assert report["confusion"].tolist() == [[0, 0, 1], [0, 0, 1], [1, 0, 1]]
    no_rules = accuracy_report(FixedLogits(logits), RuledSet([0, 1, 2, 2], ["", "", ""]), batch_size=4, device="cpu")
    assert math.isnan(no_rules["within_scene_accuracy"])


def test_plateau_rule():
    flat = pd.DataFrame({"val_acc": [0.2, 0.5, 0.90, 0.91, 0.905, 0.92, 0.915]})
    rising = pd.DataFrame({"val_acc": [0.2, 0.5, 0.80, 0.85, 0.88, 0.90, 0.92]})
    assert plateaued(flat) and not plateaued(rising) and not plateaued(flat.head(4))


def test_select_recipe_scores_candidates_on_a_held_out_part_of_train(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    model, train_config = BackboneConfig(small_input=True, width=0.0625), TrainConfig(epochs=1, batch_size=4, lr=0.01)
    search = RecipeSearch(candidates={"slow": {"lr": 1e-6}, "fast": {"lr": 0.05, "epochs": 2}}, tuning_seed=7,
                          tuning_fraction=0.5, tie_points=100.0)
    chosen, table = select_recipe(tiny_world, model, train_config, search, device="cpu")
    assert table["candidate"].tolist() == ["slow", "fast"] and table["epochs"].tolist() == [1, 2]
    assert chosen == dataclasses.replace(train_config, lr=1e-6)  # everything ties at 100 points: the first listed
    assert table["chosen"].tolist() == [True, False]
    scored = []
    monkeypatch.setattr(classifiers, "train_cached", lambda kind, recipe, fit, *, config, val_set, device: scored.append(
        (kind, config.seed, len(fit), len(val_set))) or SimpleNamespace(history=pd.DataFrame(
            {"val_acc": [0.5 if config.lr == 1e-6 else 0.9], "train_acc": [1.0], "seconds": [6.0]})))
    chosen, table = select_recipe(tiny_world, model, train_config, dataclasses.replace(search, tie_points=0.5), device="cpu")
    assert chosen.lr == 0.05 and table["tuning_acc"].tolist() == [50.0, 90.0] and table["minutes"].tolist() == [0.1, 0.1]
    n_train = len(ClassificationDataset(tiny_world, "train"))
    assert scored[0] == ("recipe_tuning", 7, n_train - round(n_train / 2), round(n_train / 2))
    assert select_recipe(tiny_world, model, train_config, RecipeSearch(), device="cpu")[0] is train_config
    with pytest.raises(ValueError, match="tuning_fraction = 1"):
        RecipeSearch(tuning_fraction=1)
    with pytest.raises(ValueError, match=r"candidate 'fast' sets \['learning_rate'\], which are no TrainConfig"):
        RecipeSearch(candidates={"fast": {"learning_rate": 0.1}})


class MaskedSamples(Dataset):
    """(image, class id, {"masks": the image's first channel > 0}): each mask marks where its image is."""

    def __init__(self, n: int = 8):
        generator = torch.Generator().manual_seed(0)
        self.images = (torch.rand(n, 3, 6, 6, generator=generator) > 0.5).float()
        self.labels = torch.arange(n) % 2

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], {"masks": self.images[i][:1].clone()}


@dataclass
class MaskAgreement:
    """A term that reads the batch's targets and checks the masks still sit on their (augmented) images."""

    name: str = "mask_agreement"
    layers: tuple = ()
    reads_targets = True
    seen: list = dataclasses.field(default_factory=list)

    def __call__(self, model, activations, *, targets):
        self.seen.append((targets["labels"].clone(), targets["masks"].clone()))
        return torch.zeros(())


def test_terms_reading_targets_get_labels_and_masks_augmented_with_their_images(monkeypatch):
    data, term = MaskedSamples(), MaskAgreement()
    images = []
    real = loop.flip_crop
    monkeypatch.setattr(loop, "flip_crop", lambda x, g, padding: images.append(real(x, g, padding=padding)) or images[-1])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    train(model, data, config=TrainConfig(epochs=1, batch_size=4, lr=0.1, augment="flip_crop", crop_padding=2),
          loss_terms=[term], device="cpu")
    assert len(term.seen) == 2
    for (labels, masks), moved in zip(term.seen, images):
        assert masks.shape == (4, 1, 6, 6) and set(labels.tolist()) <= {0, 1}
        assert torch.equal(masks, moved[:, :1]) and torch.equal(moved[:, 3:], moved[:, :1])  # same flips and crops
