"""Runs on more than one process (shared.distributed): the padding of a distributed sampler counts in no
metric, shards gathered back in dataset order, and FSDP2 sharding / saving of an attached model.

The full CLI runs under DDP / ModelParallelStrategy (2 gloo processes per domain) are in
tests/test_multiprocess.py (slow tier)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from shared.distributed import EvalShare, merge_rows, real_count, shard_indices

ROOT = Path(__file__).resolve().parents[2]


def _counted(loader, trainer_attr="val_dataloaders") -> list[int]:
    """The sample ids an EvalShare lets through, batch by batch, for one process's loader."""
    share = EvalShare()
    share.start(SimpleNamespace(testing=trainer_attr == "test_dataloaders", **{trainer_attr: loader}))
    seen = []
    for batch in loader:
        seen += batch[:share.keep(len(batch))].tolist()
    return seen


@pytest.mark.parametrize("n,world,shuffle", [(7, 2, False), (10, 3, False), (5, 4, True), (9, 2, True), (8, 2, False)])
def test_the_padding_of_a_distributed_sampler_counts_once(n, world, shuffle):
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    data = torch.arange(n)
    for make, attr in ((lambda r: DistributedSampler(data, world, r, shuffle=shuffle), "val_dataloaders"),
                       # Lightning's wrapper of a loader's own (non-default) sampler pads the same way
                       (lambda r: DistributedSamplerWrapper(SequentialSampler(data), num_replicas=world, rank=r,
                                                            shuffle=shuffle), "test_dataloaders"),
                       (lambda r: UnrepeatedDistributedSampler(data, world, r, shuffle=shuffle), "val_dataloaders")):
        padded, counted = [], []
        for rank in range(world):
            loader = DataLoader(data, batch_size=2, sampler=make(rank))
            padded += [int(i) for b in loader for i in b]
            counted += _counted(loader, attr)
        assert sorted(counted) == list(range(n))  # every sample exactly once
        if n % world and not isinstance(make(0), UnrepeatedDistributedSampler):
            assert len(padded) > n  # what the sampler hands out repeats samples: counting it would be wrong
    assert real_count(SequentialSampler(data)) is None  # one process: nothing to leave out
    assert real_count(DistributedSampler(data, 2, 0, drop_last=True)) is None
    assert shard_indices(n, 1, world) == list(range(1, n, world))


def test_merge_rows_orders_by_index_and_drops_repeats():
    a = ([0, 2, 4], {"x": torch.tensor([[0.0], [2.0], [4.0]]), "labels": torch.tensor([0, 2, 4])})
    b = ([1, 3, 0], {"x": torch.tensor([[1.0], [3.0], [9.0]]), "labels": torch.tensor([1, 3, 0])})  # 0 repeated
    merged = merge_rows([a, b, ([], {})])  # process 0, 1 (its last sample a repeat), 2 (nothing)
    assert merged["x"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # the first process's rows of a repeated index
    assert merged["labels"].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="different outputs"):
        merge_rows([a, ([5], {"x": torch.zeros(1, 1)})])
    with pytest.raises(ValueError, match="2 rows for 1 sample indices"):
        merge_rows([([0], {"x": torch.zeros(2, 1)})])
    with pytest.raises(ValueError, match="no process"):
        merge_rows([([], {})])


def test_extract_features_once_reads_every_sample_once_in_dataset_order(tmp_path):
    from shared.data import FeatureCache, extract_features_once

    data = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None], torch.arange(10))
    # a training loader: shuffled, or class-balanced with replacement (repeats, misses)
    loader = DataLoader(data, batch_size=3, sampler=torch.utils.data.RandomSampler(data, replacement=True,
                                                                                  generator=torch.Generator().manual_seed(0)))
    calls = []

    def fn(x):
        calls.append(len(x))
        return x * 2

    cache = FeatureCache(tmp_path)
    feats = extract_features_once(fn, loader, cache=cache, key="k")
    assert feats["labels"].tolist() == list(range(10)) and feats["features"].flatten().tolist() == [2.0 * i for i in range(10)]
    assert sum(calls) == 10 and cache.misses == 1
    again = extract_features_once(fn, loader, cache=cache, key="k")
    assert sum(calls) == 10 and cache.hits == 1 and torch.equal(again["features"], feats["features"])
    with pytest.raises(ValueError, match="needs a key"):
        extract_features_once(fn, loader, cache=cache)


@pytest.fixture
def one_process_world():
    """A torch.distributed world of one gloo process, inside the test process."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_model_equals_unsharded_and_saves_a_loadable_bundle(tmp_path, one_process_world):
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from fsdp_check import check
    finally:
        sys.path.pop(0)
    # ~1.5 s once timm and Hugging Face peft are imported (the first test to use them pays that)
    diffs = check(tmp_path)  # the old peft.save failed here: "invalid python storage" of a DTensor
    assert max(diffs.values()) < 1e-6, diffs  # outputs, tokens read under `whole`, gradients, save -> load


@pytest.mark.slow
def test_fsdp2_two_processes_shard_train_and_save(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "shared" / "fsdp_check.py"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    size, *diffs = (tmp_path / "result.txt").read_text().split()
    assert size == "2"
    assert all(float(d) < 1e-5 for d in diffs), diffs  # outputs, tokens under `whole`, gradients, save -> load


def test_model_parallel_strategy_refuses_tensor_parallel_with_the_flags_to_use():
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    from shared.module import shard_for_strategy

    class Mesh:  # the strategy's default on one node: every process on the tensor-parallel axis
        def __getitem__(self, dim):
            return SimpleNamespace(size=lambda: {"data_parallel": 1, "tensor_parallel": 4}[dim])

        def size(self):
            return 4

    model = torch.nn.Linear(2, 2)
    module = SimpleNamespace(_trainer=SimpleNamespace(strategy=ModelParallelStrategy()), device_mesh=Mesh())
    with pytest.raises(ValueError, match="--trainer.strategy.data_parallel_size 4 --trainer.strategy.tensor_parallel_size 1"):
        shard_for_strategy(module, model)
    for trainer in (None, SimpleNamespace(strategy=DDPStrategy())):  # load_from_checkpoint; DDP: whole model
        shard_for_strategy(SimpleNamespace(_trainer=trainer), model)
    from torch.distributed.tensor import DTensor

    assert not isinstance(model.weight, DTensor)
