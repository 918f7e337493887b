"""Runs on more than one process: which samples a process scores, gathering what the processes
computed, and FSDP2 sharding of an attached model.

Lightning's DDP / ModelParallel strategies give each process a `DistributedSampler` share of an
evaluation split; to give every process the same number of steps (a sharded model's forward is a
collective), it pads the split with repeated samples, appended after the real ones. `real_count`
says how many of a share are real, and `EvalShare` counts them off batch by batch, so no sample is
scored twice. The probe runners (no Lightning Trainer) launch under `torchrun` and use
`shard_indices` + `gather_rows` instead: each process extracts its share, process 0 gets the rows
back in dataset order.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

__all__ = ["world", "is_main", "real_count", "EvalShare", "shard_indices", "merge_rows", "gather_rows",
           "launched", "fully_shard_model", "is_sharded", "full_tensor", "whole"]


def world() -> tuple[int, int]:
    """(rank, number of processes) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the process that writes outputs (global rank 0, or the only process)."""
    return world()[0] == 0


# --------------------------------------------------------------------------- evaluation shares


def real_count(sampler: Any) -> int | None:
    """How many of the samples `sampler` gives this process are real, for a `DistributedSampler`
    (Lightning's, its wrappers, `UnrepeatedDistributedSampler`): it hands out positions rank,
    rank + world, ... of the split padded to a multiple of world with repeats, so position
    rank + j * world is real while it is below the split's length. None for other samplers (every
    sample is real) and for drop_last samplers (nothing repeated)."""
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))


class EvalShare:
    """This process's share of one evaluation epoch: `keep(n)` says how many leading samples of the
    next batch of n are real (the rest are the sampler's padding, left out of losses and metrics).
    `start(trainer)` at each validation / test epoch start reads the share from the sampler of the
    loader the trainer is running."""

    def __init__(self) -> None:
        self.limit: int | None = None
        self.seen = 0

    def start(self, trainer, dataloader_idx: int = 0) -> None:
        loaders = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        loader = loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders
        self.limit, self.seen = real_count(getattr(loader, "sampler", None)), 0

    def keep(self, n: int) -> int:
        k = n if self.limit is None else max(0, min(n, self.limit - self.seen))
        self.seen += n
        return k


def shard_indices(n: int, rank: int, size: int) -> list[int]:
    """The sample indices process `rank` of `size` extracts: every size-th, none repeated."""
    return list(range(rank, n, size))


def merge_rows(shards: Sequence[tuple[Sequence[int], Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """One {name: (N, ...)} dict from per-process (indices, {name: rows}) pairs, in index order, each
    index once (a repeated index, e.g. a padding sampler's, keeps its first rows)."""
    shards = [(list(i), r) for i, r in shards if len(i)]
    if not shards:
        raise ValueError("no process extracted any sample")
    keys = set(shards[0][1])
    for idx, rows in shards:
        if set(rows) != keys:
            raise ValueError(f"processes returned different outputs: {sorted(keys)} vs {sorted(rows)}")
        for k, v in rows.items():
            if len(v) != len(idx):
                raise ValueError(f"{k!r}: {len(v)} rows for {len(idx)} sample indices")
    index = torch.tensor([i for idx, _ in shards for i in idx])
    order = torch.argsort(index, stable=True)
    first = torch.ones(len(index), dtype=torch.bool)
    first[1:] = index[order][1:] != index[order][:-1]
    pick = order[first]
    return {k: torch.cat([rows[k] for _, rows in shards])[pick] for k in sorted(keys)}


def gather_rows(indices: Sequence[int], rows: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every process's (indices, rows) gathered onto process 0 and merged (`merge_rows`); None on
    the others. Without a process group: `merge_rows` of this process's rows."""
    rank, size = world()
    mine = (list(indices), {k: v.detach().cpu() for k, v in rows.items()})
    if size == 1:
        return merge_rows([mine])
    shards = [None] * size if rank == 0 else None
    dist.gather_object(mine, shards, dst=0)
    return merge_rows(shards) if rank == 0 else None


@contextlib.contextmanager
def launched() -> Iterator[tuple[int, int]]:
    """A process group for a command started by `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in
    the environment): NCCL with one GPU per process when CUDA is there, else gloo; destroyed on
    exit. Yields (rank, size); (0, 1) and nothing to set up for a plain start."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield world()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- FSDP2


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole (a collective: every process must call it in the
    same order); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def whole(model: nn.Module) -> Iterator[nn.Module]:
    """`model`'s root FSDP2 unit unsharded for the block (a collective), so code that calls its
    submodules directly (a backbone's `forward_features`, a decoder) outside `model.forward` reads
    whole weights; the blocks' own units still gather themselves when called, so every process
    must run the same forwards. Unsharded models: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of `model` is a DTensor (FSDP2 / tensor parallel)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def fully_shard_model(model: nn.Module, mesh=None, **kwargs) -> nn.Module:
    """Shard an attached model with FSDP2 (`torch.distributed.fsdp.fully_shard`): each backbone
    block is one unit, and `model` itself (the module the training step calls: a Classifier,
    segmenter, multi-task model) the root unit holding the rest (embeddings, norms, head, decoders,
    prompts). The root must be what is called: the backbone's own forward is reached through
    `forward_features`, which no unit on the backbone would see. The methods' hooks run inside the
    units, so they see unsharded weights. Already sharded: returned unchanged (Lightning calls
    `configure_model` for fit and again for test)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from shared import backbones
    from shared.peft import split

    if isinstance(model, FSDPModule):
        return model
    backbone, _ = split(model)
    for block in backbones.anatomy(backbone).blocks():
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model
