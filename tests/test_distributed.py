"""Data-parallel training (torchrun / DistributedDataParallel) on the CPU with the gloo backend.

Single-process training must stay what it was (no torch.distributed object, same cache keys); DDP with
one process must give the single-process weights and history bit for bit (same permutation, gradients
averaged over one rank); with two processes both ranks must end with the same weights.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from replication import cache, io
from replication.training import distributed, loop
from replication.training.loop import TrainConfig, train, train_cached
from tests.test_training import (CONFIG, RandomChannelPenalty, TinyRecipe, assert_same_history, assert_same_state,
                                 assert_same_state_dicts, make_data, make_model)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# TrainConfig's fields before data parallelism: its cache form must not change, or every cached model retrains
PRE_DDP_FIELDS = ["epochs", "batch_size", "lr", "momentum", "weight_decay", "optimizer", "schedule", "step_size", "gamma",
                  "label_smoothing", "seed", "amp", "num_workers", "augment", "crop_padding"]
AUGMENTED = dataclasses.replace(CONFIG, augment="flip_crop")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def single_process(monkeypatch):
    """No torchrun variables and no process group, whatever the shell running pytest has set."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


@pytest.fixture()
def gloo_group(single_process):
    """A one-process gloo group the test initialises itself (as a caller outside torchrun would)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run(config: TrainConfig):
    return train(make_model(0), make_data(), config=config, val_set=make_data(12, seed=1),
                 loss_terms=(RandomChannelPenalty(),), device="cpu")


def test_single_process_training_constructs_nothing_distributed(single_process, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("single-process training touched torch.distributed")

    monkeypatch.setattr(distributed, "DistributedDataParallel", refuse)
    monkeypatch.setattr(loop, "DistributedSampler", refuse)
    for name in ("init_process_group", "all_reduce", "broadcast", "barrier", "broadcast_object_list"):
        monkeypatch.setattr(loop.dist, name, refuse)
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path))
    run(AUGMENTED)
    train_cached("tiny", TinyRecipe(), make_data(), config=CONFIG, device="cpu")
    assert not dist.is_initialized()


def test_train_config_cache_form_is_unchanged_by_the_distributed_field():
    assert list(cache.canonical(CONFIG)) == PRE_DDP_FIELDS
    assert cache.config_hash(dataclasses.replace(CONFIG, distributed=True)) == cache.config_hash(CONFIG)


def test_ddp_with_one_process_gives_the_single_process_weights_and_history(gloo_group):
    single = run(AUGMENTED)
    parallel = run(dataclasses.replace(AUGMENTED, distributed=True))
    assert_same_state(parallel.model, single.model)
    assert_same_history(parallel.history, single.history)
    assert type(parallel.model) is type(single.model)  # the caller gets its own module back, not the DDP wrapper


def test_a_torchrun_launch_trains_in_a_gloo_group_and_keeps_the_cache_key(single_process, tmp_path, monkeypatch):
    monkeypatch.setenv("REPLICATION_CACHE", str(tmp_path / "single"))
    single = train_cached("tiny", TinyRecipe(), make_data(), config=CONFIG, val_set=make_data(12, seed=1), device="cpu")
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for name, value in {**torchrun, "REPLICATION_CACHE": str(tmp_path / "torchrun")}.items():
        monkeypatch.setenv(name, value)
    try:
        parallel = train_cached("tiny", TinyRecipe(), make_data(), config=CONFIG, val_set=make_data(12, seed=1), device="cpu")
        assert dist.is_initialized() and dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()
    assert_same_state(parallel.model, single.model)
    assert [p.name for p in (tmp_path / "torchrun" / "tiny").iterdir()] == [p.name for p in (tmp_path / "single" / "tiny").iterdir()]


def test_asking_for_ddp_without_a_launcher_is_one_line(single_process):
    with pytest.raises(ValueError, match=r"^cannot start data-parallel training \(.*environment variable RANK.*\); launch with torchrun") as error:
        run(dataclasses.replace(CONFIG, distributed=True))
    assert "\n" not in str(error.value) and not dist.is_initialized()


def test_the_global_batch_must_split_evenly_over_the_processes():
    assert distributed.per_rank_batch(256, 8) == 32
    with pytest.raises(ValueError, match=r"batch_size=10 is the global batch .* choose a multiple of 4"):
        distributed.per_rank_batch(10, 4)


def train_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: train through the cache, save what this rank ends with."""
    torch.set_num_threads(1)
    os.environ["REPLICATION_CACHE"] = str(Path(out) / "cache")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        config = dataclasses.replace(AUGMENTED, distributed=True)
        result = train_cached("tiny", TinyRecipe(), make_data(), config=config, val_set=make_data(12, seed=1), device="cpu")
        io.save_torch(Path(out) / f"rank{rank}.pt", {"model": result.model.state_dict(),
                                                     "history": result.history.drop(columns="seconds").to_dict("list")})
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_end_with_the_same_weights_and_one_cache_entry(tmp_path):
    mp.spawn(train_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (io.load_torch(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    assert_same_state_dicts(rank1["model"], rank0["model"])
    assert rank1["history"] == rank0["history"]
    (folder,) = (tmp_path / "cache" / "tiny").iterdir()
    assert cache.is_done(folder) and io.read_json(folder / cache.DONE_MARKER)["config"]["world_size"] == 2
    assert_same_state_dicts(io.load_torch(folder / loop.MODEL_NAME), rank0["model"])
