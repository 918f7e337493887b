"""Data helpers shared by every domain: few-shot subsets, patient-wise splits and a
feature cache for frozen-backbone methods (linear probes, kNN).

The cache is keyed by backbone fingerprint + preprocessing + dataset (DESIGN.md,
"Training and data"), so a probe's epochs cost almost nothing after the first run.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared.fs import atomic_path

__all__ = [
    "FeatureCache",
    "SyntheticDataModule",
    "synthetic_example",
    "dataset_digest",
    "extract_features_once",
    "balanced_sampler",
    "pos_weight",
    "extract_features",
    "few_shot_indices",
    "split_by_group",
]


# --------------------------------------------------------------------------- samplers


def balanced_sampler(labels: Sequence[int] | np.ndarray, seed: int = 0) -> torch.utils.data.WeightedRandomSampler:
    """Class-balanced sampling with replacement: each sample is drawn with probability proportional
    to 1 / (its class's count), so every class is expected equally often per epoch (epoch length =
    number of samples)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not len(labels):
        raise ValueError("balanced_sampler needs 1-D single-label class ids (one per training sample)")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)
    return torch.utils.data.WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                                  generator=torch.Generator().manual_seed(seed))


def pos_weight(targets: np.ndarray) -> list[float]:
    """Per-label negatives / positives of an (N, C) multi-label target matrix (NaN = unknown, left
    out): the `pos_weight` of BCE that balances each label. A label with no positive gets 1.0."""
    t = np.asarray(targets, dtype=float)
    if t.ndim != 2:
        raise ValueError(f"pos_weight needs (N, C) multi-label targets, got shape {t.shape}")
    pos = np.nansum(t == 1, axis=0)
    neg = np.nansum(t == 0, axis=0)
    return [float(n / p) if p else 1.0 for p, n in zip(pos, neg)]


# --------------------------------------------------------------------------- few-shot


def few_shot_indices(
    labels: Any,
    k: int,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
) -> np.ndarray:
    """Sorted indices of a k-shot subset.

    ``labels`` is either 1-D ints (single-label) or an N x C {0,1} matrix (multi-label).
    Both cases run the same loop over a boolean N x C membership matrix:

    * Classes are visited from rarest to most common (ties by class index), and each
      draws k *units* that are positive for it and not used by an earlier class. A unit
      is a sample, or a whole group when ``groups`` is given. Visiting rare classes first
      keeps common classes from eating the few positives the rare ones have.
    * Multi-label: a sample drawn for one class also carries its other positives, so a
      class can end up with more than k positives; it never has fewer.
    * With ``groups`` (e.g. patient ids) k distinct groups are drawn per class, and every
      item of a drawn group that is positive for that class is taken. A group is drawn at
      most once, so no group appears under two classes, but a class may receive more than
      k items (a patient with several images).

    Single-label classes are ``range(len(label_names))`` when names are given (so a class
    absent from ``labels`` is reported), else the distinct values of ``labels``. Raises
    ValueError, naming the class and how many samples/groups it has, when a class has
    fewer than k available.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels)
    n = len(labels)

    if labels.ndim == 1:
        if label_names is not None:
            classes = np.arange(len(label_names))
            if n and (labels.min() < 0 or labels.max() >= len(classes)):
                raise ValueError(f"labels must lie in [0, {len(classes)}) to match label_names")
        else:
            classes = np.unique(labels)
        member = labels[:, None] == classes[None, :]
    elif labels.ndim == 2:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("multi-label labels must be a {0,1} matrix")
        if label_names is not None and len(label_names) != labels.shape[1]:
            raise ValueError(f"{len(label_names)} label_names for {labels.shape[1]} columns")
        classes = np.arange(labels.shape[1])
        member = labels.astype(bool)
    else:
        raise ValueError(f"labels must be 1-D or 2-D, got shape {labels.shape}")

    if groups is not None:
        units = np.asarray(groups)
        if units.shape != (n,):
            raise ValueError(f"groups must have length {n}, got shape {units.shape}")
        unit_word = "groups"
    else:
        units = np.arange(n)
        unit_word = "samples"

    def name(j: int) -> str:
        return repr(label_names[j]) if label_names is not None else str(classes[j])

    rng = np.random.default_rng(seed)
    n_units = [len(np.unique(units[member[:, j]])) for j in range(len(classes))]
    used = np.zeros(0, dtype=units.dtype)
    chosen = np.zeros(n, dtype=bool)
    for j in np.argsort(n_units, kind="stable"):
        # np.unique sorts, so the draw depends only on the data and the seed.
        candidates = np.setdiff1d(np.unique(units[member[:, j]]), used)
        if len(candidates) < k:
            extra = "" if len(candidates) == n_units[j] else f" left after rarer classes (of {n_units[j]})"
            raise ValueError(
                f"class {name(j)} has {len(candidates)} {unit_word}{extra}, fewer than k={k}"
            )
        picked = rng.choice(candidates, size=k, replace=False)
        chosen |= member[:, j] & np.isin(units, picked)
        used = np.concatenate([used, picked])
    return np.flatnonzero(chosen)


def split_by_group(
    groups: Sequence[Any] | np.ndarray,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> tuple[np.ndarray, ...]:
    """Split items so that no group (patient, recording session) lands in two splits.

    ``fractions`` apply to the number of *groups*, not items: splitting by group is the
    point, and item counts then follow only on average. Returns one sorted index array
    per fraction. Raises ValueError if fractions are negative, do not sum to 1, or leave
    a split with a positive fraction empty (too few groups).
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim != 1 or len(fractions) == 0:
        raise ValueError("fractions must be a non-empty sequence")
    if (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
    groups = np.asarray(groups)
    uniq, inverse = np.unique(groups, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    # Cut points from the cumulative fractions, so rounding errors never accumulate.
    cuts = np.round(np.cumsum(fractions) * len(uniq)).astype(int)
    cuts[-1] = len(uniq)
    split_of_group = np.empty(len(uniq), dtype=int)
    for s, (lo, hi) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
        if fractions[s] > 0 and hi <= lo:
            raise ValueError(f"{len(uniq)} groups are too few: split {s} ({fractions[s]}) would be empty")
        split_of_group[order[lo:hi]] = s
    item_split = split_of_group[inverse.reshape(-1)]
    return tuple(np.flatnonzero(item_split == s) for s in range(len(fractions)))


# --------------------------------------------------------------------------- feature cache


def dataset_digest(items: Sequence[str | Path]) -> str:
    """Cheap fingerprint of a dataset, meant as the ``dataset`` part of a cache key.

    Hashes the sorted identifiers plus, for those that are existing files, their size and
    mtime_ns; file contents are never read, so it costs one stat per file. Identifiers are
    hashed as given: the same files named by relative and absolute paths digest differently.
    """
    h = hashlib.sha256()
    for item in sorted(str(i) for i in items):
        entry = item
        if os.path.isfile(item):
            st = os.stat(item)
            entry += f"\t{st.st_size}\t{st.st_mtime_ns}"
        h.update(entry.encode() + b"\n")
    return h.hexdigest()[:16]


def _to_device(x: Any, device: str | torch.device) -> Any:
    # Inputs can be a tensor or the dict/tuple of tensors an HF model takes.
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def extract_features(
    model_fn: Callable[[Any], torch.Tensor | dict[str, torch.Tensor]],
    loader: Any,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Run ``model_fn`` over every batch and concatenate the outputs along dim 0.

    A batch is ``(inputs, labels)`` or ``{"inputs": ..., "labels": ...}``; labels may be
    absent (``(inputs,)`` or no "labels" key) in every batch, and then the result has no
    "labels". A tensor output is returned as "features", a dict output keeps its keys.
    Outputs are moved to CPU per batch so a large dataset does not pile up on the GPU.
    The caller puts the model in eval mode.
    """
    outputs: dict[str, list[torch.Tensor]] = {}
    labels: list[torch.Tensor] = []
    n_batches = 0
    with torch.inference_mode():
        for batch in loader:
            if isinstance(batch, Mapping):
                inputs, y = batch["inputs"], batch.get("labels")
            else:
                inputs, y = batch[0], (batch[1] if len(batch) > 1 else None)
            out = model_fn(_to_device(inputs, device))
            out = out if isinstance(out, Mapping) else {"features": out}
            if "labels" in out:
                raise ValueError("model_fn output must not use the key 'labels'")
            for k, v in out.items():
                outputs.setdefault(k, []).append(v.detach().cpu())
            if n_batches and (y is not None) != bool(labels):
                raise ValueError("either every batch has labels or none does")
            if y is not None:
                labels.append(torch.as_tensor(y).cpu())
            n_batches += 1
    if not n_batches:
        raise ValueError("loader yielded no batches")
    # Concatenating outside inference_mode gives ordinary tensors, which a trainable probe
    # can use in autograd (inference tensors cannot be saved for backward).
    result = {k: torch.cat(v) for k, v in outputs.items()}
    if labels:
        result["labels"] = torch.cat(labels)
    return result


class FeatureCache:
    """Backbone features stored as ``root/<key>.safetensors``, computed once per key.

    Writes are atomic (temp file in the same folder, then ``os.replace``), so concurrent
    or interrupted runs never leave a half-written entry under a real key. An unreadable
    entry is treated as a miss: warned about, deleted and recomputed.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    extract_features = staticmethod(extract_features)

    @staticmethod
    def key(
        fingerprint: str,
        preprocessing: Mapping[str, Any],
        dataset: str | Mapping[str, Any],
        extractor: str = "",
    ) -> str:
        """First 16 hex of sha256 over canonical JSON of every part of the key.

        Non-JSON values (Paths, dtypes) are keyed by ``str()``; tuples key like lists.
        """
        parts = {
            "fingerprint": fingerprint,
            "preprocessing": preprocessing,
            "dataset": dataset,
            "extractor": extractor,
        }
        blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def path(self, key: str) -> Path:
        if not key or "/" in key or os.sep in key or key.startswith("."):
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / f"{key}.safetensors"

    def get_or_compute(
        self, key: str, compute: Callable[[], Mapping[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        tensors = self.load(key)
        return tensors if tensors is not None else self.store(key, compute())

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry under `key` (a hit), or None (a miss: absent, or unreadable and then deleted)."""
        path = self.path(key)
        if path.exists():
            try:
                tensors = load_file(path)
                self.hits += 1
                return tensors
            except Exception as err:  # safetensors raises its own error type for bad headers
                warnings.warn(f"feature cache entry {path} is unreadable ({err}); recomputing")
                path.unlink(missing_ok=True)
        self.misses += 1
        return None

    def store(self, key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `tensors` under `key` (atomically); returns them as a later `load` gives them."""
        # safetensors needs contiguous CPU tensors; returning these same tensors keeps
        # a miss and a later hit indistinguishable to the caller.
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(self.path(key)) as tmp:
            save_file(tensors, str(tmp))
        return tensors


def extract_features_once(
    model_fn: Callable[[Any], torch.Tensor | dict[str, torch.Tensor]],
    loader: Any,
    device: str | torch.device = "cpu",
    cache: FeatureCache | None = None,
    key: str | None = None,
) -> dict[str, torch.Tensor] | None:
    """`extract_features` of every sample of `loader.dataset` exactly once, in dataset order
    (whatever the loader's own sampler: a shuffled or class-balanced training loader would repeat
    and reorder samples), read from / written to `cache` under `key` when given.

    Under torch.distributed with several processes (a probe started by `torchrun`) each process
    extracts its share (`shared.distributed.shard_indices`), process 0 gathers the rows back in
    dataset order, writes the cache and returns them; the other processes return None. Every
    process must call it. The loader's batch size, collate function and workers are kept."""
    from torch.utils.data import DataLoader

    from shared.distributed import gather_rows, shard_indices, world

    rank, size = world()
    if cache is not None and key is None:
        raise ValueError("extract_features_once: a cache needs a key")
    if rank == 0 and cache is not None:
        cached = cache.load(key)
    else:
        cached = None
    if size > 1:
        import torch.distributed as dist

        hit = [cached is not None]
        dist.broadcast_object_list(hit, src=0)  # every process skips the extraction, or none
        if hit[0]:
            return cached if rank == 0 else None
    elif cached is not None:
        return cached
    dataset = loader.dataset
    indices = shard_indices(len(dataset), rank, size)
    rows: dict[str, torch.Tensor] = {}
    if indices:
        share = DataLoader(dataset, batch_size=loader.batch_size or 1, sampler=indices, collate_fn=loader.collate_fn,
                           num_workers=loader.num_workers)
        rows = extract_features(model_fn, share, device)
    merged = gather_rows(indices, rows)
    if rank != 0:
        return None
    return cache.store(key, merged) if cache is not None else merged


# --------------------------------------------------------------------------- synthetic data


def synthetic_example(kind: str, label: int, num_classes: int, rng: np.random.Generator,
                      shape: Sequence[int]) -> np.ndarray:
    """One deterministic, class-specific example (for demos, smoke tests and DDP tests).

    image (C, H, W): a grating whose orientation encodes the class, plus noise.
    spectrogram (T, F): a frequency band whose position encodes the class, pulsing in time.
    tokens (N,): token ids drawn mostly from a class-specific slice of the vocabulary.
    """
    if kind == "image":
        c, h, w = shape
        theta = np.pi * label / num_classes
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        wave = np.sin(2 * np.pi * 4 * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        return (np.repeat(wave[None], c, 0) + 0.5 * rng.standard_normal((c, h, w))).astype(np.float32)
    if kind == "spectrogram":
        t, f = shape
        centre = (label + 0.5) * f / num_classes
        band = np.exp(-0.5 * ((np.arange(f) - centre) / (0.15 * f / num_classes + 0.5)) ** 2)
        pulse = 0.5 + 0.5 * np.sin(2 * np.pi * np.arange(t) / (4 + label) + rng.uniform(0, 2 * np.pi))
        return (np.outer(pulse, band) + 0.3 * rng.standard_normal((t, f))).astype(np.float32)
    if kind == "tokens":
        (n,), vocab = shape[:1], shape[1] if len(shape) > 1 else 128
        span = max(1, vocab // num_classes)
        own = rng.integers(label * span, (label + 1) * span, n)
        return np.where(rng.random(n) < 0.7, own, rng.integers(0, vocab, n)).astype(np.int64)
    raise ValueError(f"unknown synthetic kind {kind!r}; expected image, spectrogram or tokens")


class SyntheticDataModule(L.LightningDataModule):
    """A small class-specific dataset in memory, split 60 / 20 / 20 per class (seeded).

    Used by the core demo, the smoke tests and the DDP test; every domain has real data modules.
    """

    def __init__(self, kind: str = "image", num_classes: int = 4, per_class: int = 40,
                 shape: tuple[int, ...] = (3, 32, 32), batch_size: int = 16, seed: int = 0,
                 num_workers: int = 0):
        super().__init__()
        self.kind, self.num_classes, self.per_class = kind, num_classes, per_class
        self.shape, self.batch_size, self.seed, self.num_workers = tuple(shape), batch_size, seed, num_workers
        self.labels = [f"class_{i}" for i in range(num_classes)]
        self.preprocessing = {"synthetic": kind, "shape": list(self.shape)}
        self.splits: dict[str, torch.utils.data.TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        rng = np.random.default_rng(self.seed)
        parts = {"train": [], "val": [], "test": []}
        for c in range(self.num_classes):
            xs = [synthetic_example(self.kind, c, self.num_classes, rng, self.shape) for _ in range(self.per_class)]
            a, b = int(0.6 * self.per_class), int(0.8 * self.per_class)
            for name, chunk in (("train", xs[:a]), ("val", xs[a:b]), ("test", xs[b:])):
                parts[name] += [(x, c) for x in chunk]
        for name, items in parts.items():
            x = torch.from_numpy(np.stack([i[0] for i in items]))
            y = torch.tensor([i[1] for i in items])
            self.splits[name] = torch.utils.data.TensorDataset(x, y)

    def _loader(self, split: str, shuffle: bool = False):
        # evaluation: sequential; under DDP each process's share comes from Lightning (shared.distributed)
        return torch.utils.data.DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle,
                                           num_workers=self.num_workers)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
