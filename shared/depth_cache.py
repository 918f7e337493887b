"""Depth caching: train only the blocks a method set adapts, from cached block inputs.

When every PEFT method on a backbone lives in blocks k.. (LoRA on the top blocks' projections,
adapters with `blocks=[...]`, a linear probe: k = the number of blocks) and the training data is
deterministic (no augmentation), the tokens entering block k never change during training. They
are computed once, with the stem and blocks 0..k-1 in eval mode under no_grad, written to disk
and keyed like the probes' feature cache (`shared.data.FeatureCache`: a fingerprint of the frozen
part of the backbone + preprocessing + data recipe + file identities, plus k and the storage
dtype); every later epoch, seed and run trains blocks k.. + the final norm + the head alone,
through the same block modules (`Anatomy.forward_from`: every method's hooks fire).

    plan = depth_plan(model)                          # k, or DepthCacheRefused with the reason
    cache = DepthCache("~/.cache/peft-suite/depth")
    rows = cache.get_or_build(key, lambda folder: write_rows(model, loader, plan.block, "fp16", folder))
    loader = cached_loader(rows, like=loader)         # batches (Resume, *rest) in the loader's order

Training modules get it through `DepthCaching` (`--model.depth_cache {off,auto,fp16,bf16,fp32}`).
What the cache cannot replay is refused with one line naming the reason, and training then runs
on the normal path: a method below k or outside the blocks (prompts inserted at block 0, LoRA on
the patch embedding, full fine-tuning, BitFit on every bias), augmentation, a family without
`forward_from` (causal decoders), several processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared.backbones import Resume, UnsupportedMethod, anatomy

__all__ = ["MODES", "STORAGE", "DepthCacheRefused", "DepthPlan", "depth_plan", "frozen_fingerprint",
           "augmentation", "data_identity", "write_rows", "DepthRows", "DepthCache", "cached_loader",
           "collate_rows", "DepthCaching", "check_mode", "DEFAULT_ROOT"]

MODES = ("off", "auto", "fp16", "bf16", "fp32")
STORAGE = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_ROOT = "~/.cache/peft-suite/depth"
VERSION = 1  # of the on-disk layout; part of every key


class DepthCacheRefused(ValueError):
    """The depth cache cannot stand in for the normal forward here (the message says why)."""


def check_mode(mode: Any, field: str = "model.depth_cache") -> str:
    """The depth_cache option as one of MODES (YAML reads an unquoted `off` as False)."""
    if mode is False or mode is None:
        return "off"
    if mode is True:
        raise ValueError(f"{field}: true is ambiguous; choose auto, fp16, bf16 or fp32 (or off)")
    if mode not in MODES:
        raise ValueError(f"{field} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


# --------------------------------------------------------------------------- where methods live
@dataclasses.dataclass(frozen=True)
class DepthPlan:
    """block: the lowest block any method adapts (n_blocks when none does: a linear probe);
    frozen_notes: train-time randomness of the frozen part that the eval-mode cache leaves out."""

    block: int
    n_blocks: int
    family: str
    frozen_notes: tuple[str, ...] = ()

    @property
    def trained(self) -> str:
        """What runs in a cached step, in words."""
        return ("the final norm + head" if self.block == self.n_blocks
                else f"{_span(self.block, self.n_blocks - 1)} + final norm + head")

    @property
    def frozen(self) -> str:
        """What ran once to write the cache, in words."""
        return f"the stem and {_span(0, self.block - 1)}"


def _span(a: int, b: int) -> str:
    return f"block {a}" if a == b else f"blocks {a}-{b}"


def _backbone(model: nn.Module) -> nn.Module:
    from shared.peft.core import split

    return split(model)[0]


def _locations(backbone: nn.Module, anat) -> dict[str, Any]:
    """{module name: block index, "norm" (the final norm), "method" (a method's own module on the
    backbone root: shared hypernetworks, prompt tokens; where it acts is where its hooks are), or
    None (outside the blocks)}."""
    index = {id(b): i for i, b in enumerate(anat.blocks())}
    norm = anat.final_norm()
    where: dict[str, Any] = {}
    for name, m in backbone.named_modules():
        if id(m) in index:
            where[name] = index[id(m)]
        elif norm is not None and m is norm:
            where[name] = "norm"
        elif name and "." not in name and name.startswith("peft_"):
            where[name] = "method"
        else:
            where[name] = where.get(name.rpartition(".")[0]) if name else None
    return where


def _touches(backbone: nn.Module, anat) -> list[tuple[Any, str]]:
    """(location, what) for everything a method does to the backbone: trained tensors, forward
    (pre-)hooks, replaced forwards, Hugging Face peft layers, buffers methods added."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from shared.peft.core import _recomputed_forward

    where = _locations(backbone, anat)
    state = getattr(backbone, "peft_state", None)
    owner = state.owner if state is not None else {}
    out = []
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            key = owner.get(name)
            out.append((where.get(name.rpartition(".")[0]), f"{f'{key!r} ' if key else ''}trains {name}"))
    for name, m in backbone.named_modules():
        label = name or type(backbone).__name__
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for fn in hooks.values():
                who = getattr(fn, "__self__", None) or getattr(getattr(fn, "func", None), "__self__", None)
                out.append((where.get(name), f"{type(who).__name__ if who is not None else 'a hook'} hooks {label}"))
        fwd = m.__dict__.get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) is not _recomputed_forward:
            out.append((where.get(name), f"a method replaces the forward of {label}"))
        if isinstance(m, BaseTunerLayer):
            out.append((where.get(name), f"{'/'.join(m.active_adapters)!r} adapts {label}"))
    for name in (state.buffers if state is not None else []):
        out.append((where.get(name.rpartition(".")[0]), f"a method's buffer {name}"))
    return out


def _frozen_notes(backbone: nn.Module, anat, k: int) -> tuple[str, ...]:
    """Dropout, drop-path, patch dropout and LayerDrop active in training below block k."""
    keep = set(range(k))
    where = _locations(backbone, anat)
    notes = []
    for name, m in backbone.named_modules():
        loc = where.get(name)
        if not (loc is None or loc in keep):
            continue
        p = None
        if isinstance(m, nn.modules.dropout._DropoutNd):
            p = m.p
        elif type(m).__name__ == "DropPath":
            p = getattr(m, "drop_prob", 0.0)
        elif type(m).__name__ == "PatchDropout":
            p = getattr(m, "prob", 0.0)
        if p:
            notes.append(f"{name} ({type(m).__name__} p={p:g})")
    cfg = getattr(backbone, "config", None)
    for attr in ("dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout",
                 "activation_dropout", "encoder_layerdrop", "layerdrop"):
        v = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and k > 0:
            note = f"config.{attr}={v:g}"
            if note not in notes:
                notes.append(note)
    return tuple(dict.fromkeys(notes))


def depth_plan(model: nn.Module) -> DepthPlan:
    """The lowest block k the attached methods adapt, from where their trained tensors, hooks and
    layers live; DepthCacheRefused when a method acts outside the blocks (besides the final norm)
    or in block 0, or the family cannot resume at a block."""
    backbone = _backbone(model)
    anat = anatomy(backbone)
    why = anat.resume_unsupported()
    if why:
        raise DepthCacheRefused(why)
    n = len(anat.blocks())
    blocks, outside = [], []
    for loc, what in _touches(backbone, anat):
        if loc is None:
            outside.append(what)
        elif isinstance(loc, int):
            blocks.append((loc, what))
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise DepthCacheRefused(f"{outside[0]}{more}: outside the transformer blocks, so the tokens entering the "
                                f"first adapted block would change as training goes on")
    k = min((loc for loc, _ in blocks), default=n)
    if k == 0:
        what = next(w for loc, w in blocks if loc == 0)
        raise DepthCacheRefused(f"{what}, in block 0: nothing below the lowest adapted block stays frozen, so "
                                f"there is nothing to cache (confine the methods to the top blocks: LoRA targets "
                                f"as a regex over block names, adapters with blocks=[...])")
    return DepthPlan(k, n, anat.family, _frozen_notes(backbone, anat, k))


def frozen_fingerprint(model: nn.Module, block: int) -> str:
    """A hash of every tensor the tokens entering `block` depend on: the backbone's state without
    blocks block.., the final norm, the methods' own modules and anything trained."""
    backbone = _backbone(model)
    anat = anatomy(backbone)
    names = {id(m): n for n, m in backbone.named_modules()}
    skip = [names[id(b)] + "." for b in anat.blocks()[block:]]
    norm = anat.final_norm()
    if norm is not None:
        skip.append(names[id(norm)] + ".")
    trained = {n for n, p in backbone.named_parameters() if p.requires_grad}
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{anat.family}|{block}|".encode())
    for name, t in sorted(backbone.state_dict(keep_vars=True).items()):
        if name in trained or name.startswith("peft_") or any(name.startswith(s) for s in skip):
            continue
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "meta":
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the data side
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    try:
        return bool(a == b)
    except Exception:
        return False


def augmentation(datamodule: Any, dataset: Any) -> str | None:
    """Why the training inputs are not the same every epoch (augmentation), or None: a data module's
    / dataset's `augment` flag or transform, else the first training example read twice and compared
    (the global random generators are restored afterwards)."""
    for obj, where in ((datamodule, "data"), (dataset, "the training dataset")):
        for attr in ("augment", "augmentation", "specaugment"):
            v = getattr(obj, attr, None) if obj is not None else None
            if v is not None and v is not False and not (isinstance(v, (int, float)) and v == 0):
                shown = type(v).__name__ if isinstance(v, nn.Module) or callable(v) else repr(v)
                return f"augmentation is on ({where}.{attr} = {shown})"
    if dataset is not None and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__") and len(dataset):
        from shared.backbones import seeded_rng

        with seeded_rng(0):
            a, b = dataset[0], dataset[0]
        if not _same(a, b):
            return "the training dataset returns different values for the same example when read twice (random augmentation?)"
    return None


_PLAIN = (str, int, float, bool, type(None))


def _jsonable(v: Any) -> Any:
    """A stable JSON form of a recipe value; objects without a stable repr (`<... at 0x...>`) drop out."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    text = repr(v)
    return None if " at 0x" in text else text


def _init_names(obj: Any) -> list[str]:
    """Constructor argument names of obj's class and its bases (up to Lightning's DataModule)."""
    names = []
    for cls in type(obj).__mro__:
        if cls.__module__.startswith(("lightning", "pytorch_lightning")) or cls is object:
            break
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names:
                names.append(p.name)
    return names


_NOT_DATA = {"batch_size", "num_workers", "persistent_workers", "pin_memory", "cache_dir", "prefetch_factor"}


def _items(dataset: Any) -> list | None:
    for path in (("items",), ("split", "items"), ("paths",), ("files",)):
        obj = dataset
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
            return list(obj)
    return list(dataset) if isinstance(dataset, list) else None


def _strings(item: Any, out: list[str]) -> None:
    if isinstance(item, (str, Path)):
        out.append(str(item))
    elif isinstance(item, (list, tuple)):
        for x in item:
            if isinstance(x, (str, Path)):
                out.append(str(x))
    elif dataclasses.is_dataclass(item) and not isinstance(item, type):
        for f in dataclasses.fields(item):
            x = getattr(item, f.name)
            if isinstance(x, (str, Path)):
                out.append(str(x))


def data_identity(datamodule: Any, dataset: Any) -> dict[str, Any]:
    """The data part of a depth-cache key: the data module's class and constructor arguments (the
    recipe, minus loader settings), an ordered hash of the training items, and the size / mtime of
    their files, of a file root and of the files directly in a folder root (label CSVs)."""
    recipe = {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"}
    for name in _init_names(datamodule):
        if name in _NOT_DATA or not hasattr(datamodule, name):
            continue
        with contextlib.suppress(Exception):
            recipe[name] = _jsonable(getattr(datamodule, name))
    from shared.data import dataset_digest

    items = _items(dataset)
    ordered = hashlib.sha256()
    files: list[str] = []
    for it in items or []:
        text = repr(it)
        ordered.update((text if " at 0x" not in text else type(it).__name__).encode() + b"\n")
        _strings(it, files)
    root = getattr(datamodule, "root", None)
    if isinstance(root, (str, Path)) and str(root):
        r = Path(root).expanduser()
        if r.is_file():
            files.append(str(r))
        elif r.is_dir():
            files += [str(p) for p in sorted(r.iterdir()) if p.is_file()]
    return {"recipe": recipe, "items": ordered.hexdigest()[:16] if items is not None else None,
            "n_items": len(items) if items is not None else None,
            "files": dataset_digest([f for f in files if os.path.isfile(f)]), "n": len(dataset)}


# --------------------------------------------------------------------------- storage
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.float64: np.float64,
          torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8,
          torch.uint8: np.uint8, torch.bool: np.bool_}
_TORCH = {str(t).removeprefix("torch."): t for t in _NUMPY}


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16: the same 16 bits, read back with .view
    return t.numpy().tobytes()


class _Writer:
    """Fields written as flat raw streams (`<name>.bin`), one (shape) row per example."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Any] = {}
        self.shapes: dict[str, list[tuple[int, ...]]] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def add(self, name: str, rows: torch.Tensor | list[torch.Tensor]) -> None:
        """A batch of rows: a (B, ...) tensor (same shape each) or a list of per-example tensors."""
        batch = [rows] if isinstance(rows, torch.Tensor) else rows
        for t in batch:
            if t.dtype not in _NUMPY:
                raise DepthCacheRefused(f"field {name!r} has dtype {t.dtype}, which the depth cache does not store")
            if self.dtypes.setdefault(name, t.dtype) != t.dtype:
                raise DepthCacheRefused(f"field {name!r} changes dtype between batches ({self.dtypes[name]} vs {t.dtype})")
        if name not in self.files:
            self.files[name] = open(self.folder / f"{name}.bin", "wb")
            self.shapes[name] = []
        f = self.files[name]
        if isinstance(rows, torch.Tensor):
            f.write(_bytes(rows))
            self.shapes[name] += [tuple(rows.shape[1:])] * rows.shape[0]
        else:
            for t in rows:
                f.write(_bytes(t))
                self.shapes[name].append(tuple(t.shape))

    def close(self) -> dict[str, dict]:
        from safetensors.torch import save_file

        for f in self.files.values():
            f.close()
        index = {}
        for name, shapes in self.shapes.items():
            nd = {len(s) for s in shapes}
            if len(nd) != 1:
                raise DepthCacheRefused(f"field {name!r} changes rank between examples")
            index[f"{name}.shapes"] = torch.tensor(shapes, dtype=torch.int64).reshape(len(shapes), nd.pop())
        save_file(index, str(self.folder / "index.safetensors"))
        return {name: {"dtype": str(self.dtypes[name]).removeprefix("torch.")} for name in self.files}


def _split_batch(batch: Any) -> tuple[Any, list[torch.Tensor]]:
    if not isinstance(batch, (tuple, list)) or not batch:
        raise DepthCacheRefused(f"training batches are {type(batch).__name__}; the depth cache replays "
                                f"(inputs, targets, ...) tuples")
    inputs, rest = batch[0], list(batch[1:])
    for j, r in enumerate(rest, start=1):
        if not isinstance(r, torch.Tensor):
            raise DepthCacheRefused(f"item {j} of the training batches is a {type(r).__name__}, not a tensor")
    return inputs, rest


def _to_device(x: Any, device: torch.device) -> Any:
    """Inputs (a tensor, or the dict / tuple of tensors an HF model takes) on `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _pad_key(t: torch.Tensor) -> Any:
    v = t.item()
    return "nan" if isinstance(v, float) and v != v else v


@contextlib.contextmanager
def _rng_kept():
    """Every random generator (torch CPU / CUDA, numpy, Python) as it was before the block: writing the
    cache draws nothing the training run would have drawn (the same seed gives the same shuffles)."""
    import random

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def write_rows(model: nn.Module, loader: Any, block: int, storage: str, folder: str | os.PathLike,
               autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the tokens entering `block` for every example of `loader.dataset`, once and in dataset
    order (`loader`'s batch size, collate function and workers), with the backbone in eval mode under
    no_grad (and `autocast()`, e.g. the trainer's precision context), plus the rest of each batch
    (targets, ...), into `folder`; returns the meta written to `folder/meta.json`.

    Batches are (inputs, *rest) tuples. With a text encoder's attention mask, each example's tokens
    (and every rest tensor with a per-token dimension) are stored at its own length, and the value
    the loader padded them with is recorded for re-batching. `storage`: fp16 | bf16 | fp32."""
    from torch.utils.data import DataLoader, SequentialSampler

    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {sorted(STORAGE)}, got {storage!r}")
    dtype = STORAGE[storage]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone = _backbone(model)
    anat = anatomy(backbone)
    dataset = loader.dataset
    once = DataLoader(dataset, batch_size=loader.batch_size or 1, sampler=SequentialSampler(dataset),
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers)
    ref = next(backbone.parameters())
    device = ref.device
    writer = _Writer(folder)
    masked: bool | None = None
    per_token: list[bool] | None = None
    pads: list[set] = []
    grid, ndim, mask_dtype, n, lengths = None, None, None, 0, set()
    t0 = time.perf_counter()
    try:
        with _rng_kept(), torch.no_grad(), _eval_mode(backbone), (autocast() if autocast else contextlib.nullcontext()):
            for b, batch in enumerate(once):
                inputs, rest = _split_batch(batch)
                try:
                    r = anat.tokens_entering(block, _to_device(inputs, device))
                except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as e:
                    if isinstance(e, UnsupportedMethod):
                        raise DepthCacheRefused(str(e)) from None
                    shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                    raise DepthCacheRefused(f"the backbone cannot take the training inputs directly ({shape}: "
                                            f"{str(e).splitlines()[0][:160]}); the model's forward transforms them "
                                            f"first (e.g. 3D volumes classified from slices), which the cached "
                                            f"path does not replay") from None
                x = r.tokens.detach().float()  # (B, N, D), or Swin (B, H, W, C)
                stored = x.to(dtype)
                if not torch.isfinite(stored).all() and torch.isfinite(x).all():
                    big = float(x.abs().max())
                    raise DepthCacheRefused(f"the tokens entering block {block} reach |x| = {big:.4g}, beyond "
                                            f"{storage}'s range; use --model.depth_cache bf16 or fp32")
                B = stored.shape[0]
                if masked is None:
                    masked, grid, ndim = r.mask is not None, r.grid, r.input_ndim
                    mask_dtype = str(r.mask.dtype).removeprefix("torch.") if masked else None
                    per_token = [masked and t.ndim >= 2 and t.shape[1] == stored.shape[1] for t in rest]
                    pads = [set() for _ in rest]
                if (r.mask is not None) != masked or r.grid != grid or len(rest) != len(per_token):
                    raise DepthCacheRefused(f"training batch {b} differs in structure from the first one "
                                            f"(mask, patch grid or number of items)")
                if not masked:
                    writer.add("tokens", stored)
                    for j, t in enumerate(rest):
                        writer.add(f"rest{j}", t.detach().cpu())
                else:
                    mask = r.mask.detach().cpu()
                    lens = mask.long().sum(1)
                    N = mask.shape[1]
                    if not torch.equal(mask.bool(), torch.arange(N)[None] < lens[:, None]):
                        raise DepthCacheRefused("the attention mask is not right padding (real tokens first, then "
                                                "padding); the depth cache stores each example at its own length")
                    lens = lens.tolist()
                    lengths.update(lens)
                    writer.add("tokens", [stored[i, :k].cpu() for i, k in enumerate(lens)])
                    for j, t in enumerate(rest):
                        t = t.detach().cpu()
                        if per_token[j] != (t.ndim >= 2 and t.shape[1] == N):
                            raise DepthCacheRefused(f"item {j + 1} of batch {b} is per token in some batches only")
                        if not per_token[j]:
                            writer.add(f"rest{j}", t)
                            continue
                        writer.add(f"rest{j}", [t[i, :k] for i, k in enumerate(lens)])
                        for i, k in enumerate(lens):
                            pads[j].update(_pad_key(v) for v in t[i, k:].reshape(-1)[:64])
                n += B
                if progress and b and b % 200 == 0:
                    progress(f"depth cache: {n}/{len(dataset)} examples")
        fields = writer.close()
    except BaseException:
        for f in writer.files.values():
            f.close()
        raise
    pad_values = []
    for j, seen in enumerate(pads):
        if len(seen) > 1:
            raise DepthCacheRefused(f"item {j + 1} of the training batches is padded with several values {sorted(map(str, seen))}")
        if per_token and per_token[j] and not seen and len(lengths) > 1:
            raise DepthCacheRefused(f"item {j + 1} of the training batches is per token, but no batch showed the value "
                                    f"it is padded with")
        v = next(iter(seen)) if seen else None
        pad_values.append(float("nan") if v == "nan" else v)
    if n != len(dataset):
        raise DepthCacheRefused(f"the loader gave {n} examples for a dataset of {len(dataset)}")
    meta = {"version": VERSION, "n": n, "block": block, "storage": storage, "family": anat.family,
            "masked": bool(masked), "mask_dtype": mask_dtype, "grid": list(grid) if grid else None,
            "input_ndim": ndim, "n_rest": len(per_token or []), "per_token": per_token or [],
            "pad": [None if v is None else ("nan" if v != v else v) for v in pad_values],
            "fields": fields, "seconds": round(time.perf_counter() - t0, 3)}
    meta["bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


class DepthRows(torch.utils.data.Dataset):
    """A written depth cache, read through memory maps: row i = {"tokens", "rest0", ...} tensors."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors.torch import load_file

        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("version") != VERSION:
            raise ValueError(f"{self.folder}: depth cache layout version {self.meta.get('version')}, expected {VERSION}")
        index = load_file(str(self.folder / "index.safetensors"))
        self.fields = sorted(self.meta["fields"])
        self._shapes, self._offsets, self._dtypes, self._maps = {}, {}, {}, {}
        for name in self.fields:
            shapes = index[f"{name}.shapes"]
            if len(shapes) != self.meta["n"]:
                raise ValueError(f"{self.folder}: {name} has {len(shapes)} rows for n={self.meta['n']}")
            counts = shapes.prod(1) if shapes.shape[1] else torch.ones(len(shapes), dtype=torch.int64)
            offsets = torch.zeros(len(shapes) + 1, dtype=torch.int64)
            offsets[1:] = counts.cumsum(0)
            dtype = _TORCH[self.meta["fields"][name]["dtype"]]
            npdtype = np.dtype(_NUMPY[dtype])
            path = self.folder / f"{name}.bin"
            if path.stat().st_size != int(offsets[-1]) * npdtype.itemsize:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, expected {int(offsets[-1]) * npdtype.itemsize}")
            self._shapes[name], self._offsets[name], self._dtypes[name] = shapes.tolist(), offsets.tolist(), dtype
            self._maps[name] = (path, npdtype)
        self._open: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.meta["n"])

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    def _map(self, name: str) -> np.ndarray:
        m = self._open.get(name)
        if m is None:
            path, npdtype = self._maps[name]
            m = np.memmap(path, dtype=npdtype, mode="r") if path.stat().st_size else np.zeros(0, npdtype)
            self._open[name] = m
        return m

    def __getstate__(self):  # loader workers reopen the maps
        return {**self.__dict__, "_open": {}}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.fields:
            a, b = self._offsets[name][i], self._offsets[name][i + 1]
            t = torch.from_numpy(np.array(self._map(name)[a:b]))
            if self._dtypes[name] == torch.bfloat16:
                t = t.view(torch.bfloat16)
            out[name] = t.reshape(self._shapes[name][i])
        return out


def _stack(rows: list[torch.Tensor], pad: Any) -> torch.Tensor:
    if all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    n = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), n, *rows[0].shape[1:]), float("nan") if pad == "nan" else pad, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out


def collate_rows(meta: dict[str, Any]) -> Callable[[list[dict]], tuple]:
    """The collate function of a depth cache: rows -> (Resume, *rest), re-padded to the batch's longest
    example with the values the original loader used (tokens with 0, the mask with 0)."""
    block, grid, ndim = meta["block"], meta["grid"], meta["input_ndim"]
    pads = meta["pad"]
    mask_dtype = _TORCH[meta["mask_dtype"]] if meta.get("masked") else None

    def collate(rows: list[dict]) -> tuple:
        tokens = _stack([r["tokens"] for r in rows], 0)
        mask = None
        if mask_dtype is not None:
            lens = torch.tensor([r["tokens"].shape[0] for r in rows])
            mask = (torch.arange(tokens.shape[1])[None] < lens[:, None]).to(mask_dtype)  # (B, N)
        rest = [_stack([r[f"rest{j}"] for r in rows], pads[j] if pads[j] is not None else 0)
                for j in range(meta["n_rest"])]
        return (Resume(block, tokens, mask, tuple(grid) if grid else None, ndim), *rest)

    return collate


def cached_loader(rows: DepthRows, like: Any) -> torch.utils.data.DataLoader:
    """A DataLoader over `rows` that draws examples as `like` (the original training loader) does:
    its sampler (shuffle: the same RandomSampler, so the same seed gives the same order) or batch
    sampler, batch size and drop_last; no workers (rows are read from a memory map)."""
    from torch.utils.data import BatchSampler, DataLoader

    collate = collate_rows(rows.meta)
    bs = getattr(like, "batch_sampler", None)
    if bs is not None and type(bs) is not BatchSampler:  # a custom batch sampler: kept as it is
        return DataLoader(rows, batch_sampler=bs, collate_fn=collate, pin_memory=like.pin_memory)
    return DataLoader(rows, batch_size=like.batch_size, sampler=like.sampler, drop_last=like.drop_last,
                      collate_fn=collate, pin_memory=like.pin_memory)


class DepthCache:
    """Depth caches as folders `root/<key>/` (meta.json, index.safetensors, <field>.bin), each
    written once into a temporary folder beside it and moved into place whole; an entry that
    does not read back is warned about, removed and rewritten."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, preprocessing: Mapping[str, Any], data: Mapping[str, Any], block: int,
            storage: str, extra: str = "") -> str:
        from shared.data import FeatureCache

        return FeatureCache.key(fingerprint, preprocessing, data,
                                extractor=f"depth_cache/v{VERSION}:block={block}:storage={storage}:{extra}")

    def path(self, key: str) -> Path:
        if not key or "/" in key or os.sep in key or key.startswith("."):
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key

    def load(self, key: str, n: int | None = None) -> DepthRows | None:
        folder = self.path(key)
        if folder.is_dir():
            try:
                rows = DepthRows(folder)
                if n is not None and len(rows) != n:
                    raise ValueError(f"{len(rows)} rows for a dataset of {n}")
                self.hits += 1
                return rows
            except Exception as e:
                print(f"warning: depth cache entry {folder} is unreadable ({e}); rewriting it", file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
        self.misses += 1
        return None

    def get_or_build(self, key: str, write: Callable[[Path], Any], n: int | None = None) -> DepthRows:
        """The entry under `key`, or `write(folder)` into a temporary folder that then becomes it."""
        rows = self.load(key, n)
        return rows if rows is not None else self.build(key, write)

    def build(self, key: str, write: Callable[[Path], Any]) -> DepthRows:
        from shared.fs import replace_dir

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key}.tmp-"))
        try:
            write(tmp)
            replace_dir(tmp, self.path(key))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return DepthRows(self.path(key))


# --------------------------------------------------------------------------- Lightning modules
def _first_loader(loader: Any) -> Any:
    if isinstance(loader, Mapping) or (isinstance(loader, Sequence) and not hasattr(loader, "dataset")):
        raise DepthCacheRefused("the data module gives several training loaders; the depth cache replays one")
    return loader


class DepthCaching:
    """Mixin for the PEFT LightningModules: with `hparams.depth_cache` other than "off", `fit` trains
    from a depth cache of the training split when the attached methods and the data allow it (else one
    warning line, and the normal path). Validation and testing always run the whole model.

    The module's `setup("fit")` wraps its data module's `train_dataloader` once: the first call (Lightning
    makes it when the model is on its device) builds or reads the cache and returns a loader of
    (Resume, *rest) batches; `Classifier` runs a Resume through `forward_from`. `depth_cache_status`
    records what was decided (active, block, path, reason)."""

    depth_cache_status: dict[str, Any] | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.depth_cache_setup(stage)

    def _say(self, line: str, warn: bool = False) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or trainer.is_global_zero:
            print(f"{'warning: ' if warn else ''}{line}", file=sys.stderr if warn else sys.stdout, flush=True)

    def _refuse(self, mode: str, reason: str) -> None:
        self.depth_cache_status = {"active": False, "mode": mode, "reason": reason}
        self._say(f"depth_cache {mode}: not used: {reason}; training runs on the normal path", warn=True)

    def depth_cache_setup(self, stage: str) -> None:
        mode = check_mode(self.hparams.get("depth_cache", "off") if hasattr(self, "hparams") else "off")
        if stage != "fit" or mode == "off":
            return
        trainer = self.trainer
        dm = trainer.datamodule
        if dm is None:
            return self._refuse(mode, "it needs a LightningDataModule (trainer.fit(model, datamodule=...))")
        previous = getattr(dm.__dict__.get("train_dataloader"), "depth_cache_original", None)
        if previous is not None:  # left by a fit that stopped before asking for its loader
            dm.train_dataloader = previous
        original = dm.__dict__.get("train_dataloader")
        bound = dm.train_dataloader

        def train_dataloader():
            # the loader is asked for once per fit (refused below when it is rebuilt every epoch)
            if original is None:
                dm.__dict__.pop("train_dataloader", None)
            else:
                dm.train_dataloader = original
            loader = bound()
            try:
                return self._depth_loader(_first_loader(loader), dm, mode)
            except DepthCacheRefused as e:
                self._refuse(mode, str(e))
                return loader

        train_dataloader.depth_cache_original = bound
        dm.train_dataloader = train_dataloader

    def _depth_loader(self, loader: Any, dm: Any, mode: str):
        trainer = self.trainer
        if trainer.world_size > 1:
            raise DepthCacheRefused(f"it runs on one process, this run has {trainer.world_size}")
        if trainer.reload_dataloaders_every_n_epochs:
            raise DepthCacheRefused("trainer.reload_dataloaders_every_n_epochs rebuilds the training loader every epoch")
        plan = depth_plan(self.model)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise DepthCacheRefused(f"the training loader ({type(loader).__name__}) has no dataset")
        why = augmentation(dm, dataset)
        if why:
            raise DepthCacheRefused(f"{why}: the tokens entering block {plan.block} would differ every epoch; turn it "
                                    f"off (e.g. --data.init_args.augment false, --data.init_args.specaugment false)")
        precision = str(trainer.precision)
        storage = mode if mode != "auto" else ("bf16" if "bf16" in precision else "fp16")
        backbone = _backbone(self.model)
        root = self.hparams.get("depth_cache_dir") or DEFAULT_ROOT
        cache = DepthCache(root)
        t0 = time.perf_counter()
        key = cache.key(frozen_fingerprint(self.model, plan.block), getattr(dm, "preprocessing", None) or {},
                        data_identity(dm, dataset), plan.block, storage,
                        extra=f"{plan.family}:precision={precision}:dtype={next(backbone.parameters()).dtype}")
        key_s = time.perf_counter() - t0
        n = len(dataset)
        t1 = time.perf_counter()
        rows = cache.load(key, n)
        built = rows is None
        if built:
            self._say(f"depth cache: writing the tokens entering block {plan.block} of {plan.n_blocks} for {n} training "
                      f"examples ({storage}; {plan.frozen} run once, in eval mode) to {cache.path(key)}")
            autocast = trainer.precision_plugin.forward_context
            rows = cache.build(key, lambda folder: write_rows(self.model, loader, plan.block, storage, folder,
                                                              autocast=autocast, progress=self._say))
        notes = (f"; their train-time randomness is left out: {', '.join(plan.frozen_notes)}"
                 if plan.frozen_notes else "")
        self.depth_cache_status = {"active": True, "mode": mode, "block": plan.block, "n_blocks": plan.n_blocks,
                                   "storage": storage, "path": str(rows.folder), "bytes": rows.nbytes,
                                   "written": built, "seconds": round(time.perf_counter() - t1, 3),
                                   "key_seconds": round(key_s, 3)}
        self._say(f"depth cache: training {plan.trained} from the cached tokens entering block {plan.block} "
                  f"({'written' if built else 'read'} in {time.perf_counter() - t1:.1f} s, {rows.nbytes / 2**20:.1f} MiB "
                  f"{storage}, {rows.folder}); {plan.frozen} ran in eval mode{notes}")
        return cached_loader(rows, like=loader)
