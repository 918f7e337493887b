"""Batched prediction for the predict CLIs (`audio`, `medical`, `vision`, `text`): one place for the
DataLoader, the per-file errors and the ordering.

    for got in predict_batches(files, load, run, batch_size=16, workers=1, errors=(AudioError,)):
        ...  # (file, run's result) for each file, in the order given, or a file's error as soon as it is found

- `load(file)` decodes one file (in a DataLoader worker process when `workers` > 0, so decoding
  overlaps the model's forward). An error of an `errors` type is caught there and comes back as
  that file's result: the file is named and skipped, the rest of its batch is still predicted.
  `load` returns the decoded input, or a `Loaded` carrying warnings (printed as the file arrives)
  or `alone=True` (a 3D volume: it is its own batch).
- `run(inputs)` predicts a batch of decoded inputs and returns one result per input. A batch whose
  `run` raises an `errors` exception is run again file by file, so only the file at fault is lost.
- Results come out in input order as each batch finishes; errors as soon as each file arrives from
  the loader (so before the results of earlier files of the same batch). Nothing is accumulated:
  at most one batch of decoded inputs waits in the main process, about one more in the workers.
- An unexpected error while decoding (a bug, a crash) raises, as without batches, after the batch
  already decoded has been predicted and yielded: no result made before it is lost.
- With workers, the first file is decoded in the main process before they start, so whatever
  decoding imports or caches on first use (MONAI, pydicom, a tokenizer) is loaded once and
  inherited by the forked workers; a single file never starts a worker.

Defaults (`add_arguments`, `resolve`): `--batch-size` 16 on the CPU (the predict CLIs run there;
`BATCH_ACCELERATOR` when the model sits on a GPU), `--workers` min(4, CPUs - 1), 0 on a one-core
machine (and for a single file): one core is left to the model's forward.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

BATCH_CPU = 16  # beyond this a CPU forward gains < 10% per file (benchmarks/predict_throughput.py) and costs memory
BATCH_ACCELERATOR = 64
MAX_WORKERS = 4


@dataclass
class Loaded:
    """What `load` returns when it has more to say than the decoded input."""

    data: Any
    warnings: tuple[str, ...] = ()  # each printed as "warning: ..." on stderr when the file arrives
    alone: bool = False  # predict it in a batch of its own (a volume: its slices are the batch)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(cpus: int | None = None) -> int:
    """Decoding workers: min(4, CPUs - 1), 0 (decode in the main process) on a one-core machine."""
    cpus = cpu_count() if cpus is None else cpus
    return 0 if cpus <= 1 else min(MAX_WORKERS, cpus - 1)


def default_batch_size(device: torch.device | str | None = None) -> int:
    """Files per forward: 16 on the CPU, 64 on an accelerator."""
    kind = torch.device(device).type if device is not None else "cpu"
    return BATCH_CPU if kind == "cpu" else BATCH_ACCELERATOR


def _workers_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (decode in the main process) or a positive number, got {text}")
    return value


def _batch_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(ap: argparse.ArgumentParser, unit: str = "files") -> None:
    """--batch-size and --workers, with the defaults above (resolved by `resolve`)."""
    ap.add_argument("--batch-size", type=_batch_arg, default=None, metavar="N",
                    help=f"{unit} per forward of the model (default {BATCH_CPU} on the CPU, {BATCH_ACCELERATOR} on a "
                         f"GPU; 1 predicts them one at a time)")
    ap.add_argument("--workers", type=_workers_arg, default=None, metavar="N",
                    help=f"processes decoding the {unit} while the model runs (default min({MAX_WORKERS}, CPUs - 1) "
                         f"= {default_workers()} here; 0 decodes in the main process)")


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def resolve(args, model=None) -> tuple[int, int]:
    """(batch size, workers) from parsed --batch-size / --workers (None: the defaults for `model`)."""
    batch = args.batch_size if getattr(args, "batch_size", None) else default_batch_size(
        model_device(model) if model is not None else None)
    workers = args.workers if getattr(args, "workers", None) is not None else default_workers()
    return batch, workers


def warn_line(message: str) -> None:
    sys.stdout.flush()  # the results before it come first, as they were made
    print(f"warning: {message}", file=sys.stderr, flush=True)


class _Files(Dataset):
    """Items `start`.. of the file list as a map-style dataset: j -> (start + j, Loaded | the file's error)."""

    def __init__(self, items: Sequence, load: Callable, errors: tuple[type[BaseException], ...], start: int = 0):
        self.items, self.load, self.errors, self.start = items, load, errors, start

    def __len__(self) -> int:
        return len(self.items) - self.start

    def __getitem__(self, j: int):
        i = self.start + j
        try:
            got = self.load(self.items[i])
        except self.errors as e:
            return i, e
        return i, got if isinstance(got, Loaded) else Loaded(got)


def _as_is(item):  # collate_fn of single items (module level: picklable for spawned workers)
    return item


def _decoded(items: Sequence, load: Callable, errors, workers: int, batch_size: int) -> Iterator[tuple[int, Any]]:
    """(index, Loaded | error) for every item, in order. With workers, the first item is decoded
    here first: whatever its decoding imports or caches on first use (MONAI, pydicom, a
    tokenizer) is then loaded once and inherited by the forked workers, not once per worker."""
    if not workers:
        yield from _Files(items, load, errors)
        return
    yield _Files(items, load, errors)[0]
    if len(items) == 1:
        return
    rest = _Files(items, load, errors, start=1)
    workers = 0 if len(rest) <= 1 else workers
    extra = {"prefetch_factor": max(2, math.ceil(batch_size / workers) + 1)} if workers else {}
    # enough decoded files in flight to fill the next batch while this one runs
    it = iter(DataLoader(rest, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is, **extra))
    try:
        yield from it
    finally:
        # Stop the workers now (done, an early return, an error). Left to the iterator's __del__, an error's
        # traceback keeps it alive until the garbage collector frees the cycle, queues first: then every
        # worker is waited for 5 s (torch's MP_STATUS_CHECK_INTERVAL) before it is killed.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def predict_batches(items: Sequence, load: Callable[[Any], Any], run: Callable[[list], list], *,
                    batch_size: int, workers: int, errors: tuple[type[BaseException], ...] = (ValueError,),
                    warn: Callable[[str], None] = warn_line) -> Iterator[Any]:
    """Yield, for each of `items` in order, `(item, run's result)`, or (as soon as the loader hands
    it over) the item's exception of an `errors` type; see the module docstring. `load` must be
    picklable where worker processes are spawned rather than forked (a module-level function, a
    functools.partial of one, or an object of a module-level class)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    workers = 0 if len(items) <= 1 else max(0, workers)
    pending: list[tuple[int, Any]] = []  # (index, decoded input) of the batch being filled

    def flush():
        batch = list(pending)
        pending.clear()
        yield from _run(items, batch, run, errors)

    decoded = _decoded(items, load, errors, workers, batch_size)
    try:
        while True:
            try:
                i, got = next(decoded)
            except StopIteration:
                break
            except Exception:
                yield from flush()  # what was decoded before the crash is still predicted
                raise
            if isinstance(got, BaseException):
                yield got
                continue
            for w in got.warnings:
                warn(w)
            if got.alone:
                yield from flush()
                yield from _run(items, [(i, got.data)], run, errors)
                continue
            pending.append((i, got.data))
            if len(pending) >= batch_size:
                yield from flush()
        yield from flush()
    finally:
        decoded.close()  # stops the workers now


def _run(items: Sequence, batch: list[tuple[int, Any]], run: Callable[[list], list], errors) -> Iterator[Any]:
    if not batch:
        return
    try:
        out = run([data for _, data in batch])
    except errors as e:
        if len(batch) == 1:
            yield e
            return
        for one in batch:  # which file was it: the others are still predicted
            yield from _run(items, [one], run, errors)
        return
    if len(out) != len(batch):
        raise RuntimeError(f"a batch of {len(batch)} inputs gave {len(out)} results")
    for (i, _), result in zip(batch, out):
        yield items[i], result


def stacked(inputs: list[torch.Tensor], forward: Callable[[torch.Tensor], Any]) -> list[Any]:
    """Forward each group of equally shaped inputs as one stacked batch (`forward` gets (B, ...)
    and returns a tensor, or a dict of tensors, with B rows) and give each input its own row, in
    input order. Inputs of different shapes (no padding needed) are simply separate forwards."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault((tuple(x.shape), x.dtype), []).append(i)
    out: list[Any] = [None] * len(inputs)
    for members in groups.values():
        y = forward(torch.stack([inputs[i] for i in members]))
        for row, i in enumerate(members):
            out[i] = {k: v[row] for k, v in y.items()} if isinstance(y, dict) else y[row]
    return out
