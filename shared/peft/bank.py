"""Serving many adapters from one loaded backbone: `AdapterBank`.

    bank = peft.AdapterBank(model, {"site_a": "runs/a/adapter", "site_b": "runs/b/adapter"})
    logits = bank(x, adapters=["site_a", "site_b", "site_a"])  # row i through adapters[i], ONE forward
    with bank.rows(["site_a", "site_b", "site_a"]):            # the same around any forward
        out = model(x)
    bank.use("site_b")                                         # or copy one adapter into the model

`model` is a backbone with methods attached through `shared.peft` (or a `Classifier` around one);
the bank holds K adapters of exactly those methods: bundles written by `peft.save` or state dicts
(`trained_tensors` names, or a bundle's `backbone.` / `head.` names). Served methods: LoRA (Hugging
Face peft's `lora.Linear` layers) and bottleneck adapters (parallel and sequential), alone or together.
Every adapter has the model's methods and shapes; what may differ per adapter is its scaling (LoRA
`alpha`, adapter `scale`). Different ranks or methods per row are refused, as are merged models.

How one forward serves K adapters: each served layer's adapter tensors are stacked once (LoRA
A^T: (K, d_in, r), s_k B^T: (K, r, d_out); adapter down (K, d_in, b) and up (K, b, d_out) with
their biases), gathered by the row -> adapter index (B,), and applied with one batched matmul per
projection (`torch.bmm`): no Python loop over adapters inside the layers, the base layer runs once.
A classification head, when the adapters carry one, is applied per group of rows (heads are small).

The row -> adapter index travels in a context variable set by `rows()`, never on a module, so a
forward is stateless per call: threads serving different batches on one model do not see each
other's rows (DESIGN.md). Served layers get a dispatching `forward` (LoRA, head) or `delta`
(adapters) once, at the bank's creation: outside `rows()` they run exactly as before.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.artifacts import META, TENSORS, BundleError, read_checked_tensors, read_meta, resolve, trained_tensors
from shared.backbones import anatomy

from .adapters import Adapter, Bottleneck, module_name
from .base import state_of
from .lora import LoRA

# The scaling fields of each served method: they may differ per adapter (a per-adapter factor);
# every other field fixes a tensor's shape or the maths and must equal the model's. Dropout is
# inactive when serving (eval), so it may differ too.
SERVED = {LoRA: ("alpha", "dropout"), Adapter: ("scale",)}


@dataclasses.dataclass(frozen=True)
class _Rows:
    """One `rows()` call: the row -> adapter index and the stacked tensors it was built against."""

    idx: torch.Tensor  # (B,) long, on the model's device
    n: int  # rows in the batch
    sites: dict[int, Any]  # id(served module) -> its stacks (immutable for this call)


_ROWS: contextvars.ContextVar[_Rows | None] = contextvars.ContextVar("peft_adapter_bank_rows", default=None)


class _Dispatch:
    """A served module's `forward` / `delta` (an instance attribute): the bank's per-row path inside
    `AdapterBank.rows`, the module's own method elsewhere. Holds the module (not a closure), so a deep
    copy of the model dispatches for the copy."""

    def __init__(self, module: nn.Module, attr: str):
        self.module, self.attr = module, attr

    def __call__(self, *args, **kwargs):
        ctx = _ROWS.get()
        if ctx is not None:
            site = ctx.sites.get(id(self.module))
            if site is not None:
                return site(ctx, self.module, *args, **kwargs)
            raise RuntimeError(f"AdapterBank.rows: a served {type(self.module).__name__} of another model (or of a copy "
                               f"of the bank's model) ran inside the bank's rows(); run the bank's own model there")
        return getattr(type(self.module), self.attr)(self.module, *args, **kwargs)


def _serve(module: nn.Module, attr: str, check_only: bool = False) -> None:
    current = module.__dict__.get(attr)
    if isinstance(current, _Dispatch) and current.module is module:
        return  # another bank on this model installed it: dispatch reads the active rows, not the bank
    if current is not None:
        raise ValueError(f"AdapterBank: {type(module).__name__} already has its own {attr} override; cannot serve it")
    if not check_only:
        setattr(module, attr, _Dispatch(module, attr))


def _check_block_rows(block, args, kwargs):
    """Forward pre-hook on every block: inside `rows()` the block's batch must have one row per name."""
    ctx = _ROWS.get()
    x = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("hidden_states")
    if ctx is not None and torch.is_tensor(x) and x.dim() >= 2 and x.shape[0] != ctx.n:
        raise ValueError(f"AdapterBank.rows: {ctx.n} adapter names for a batch of {x.shape[0]} rows; give one name per row")


def _per_row(ctx: _Rows, x: torch.Tensor, first, second, first_bias=None, second_bias=None, act=None) -> torch.Tensor:
    """x (L, ..., d_in) -> act(x W1[row] + b1[row]) W2[row] + b2[row]: (L, ..., d_out), one bmm each.

    The leading dimension holds the batch rows in order, or rows x windows (Swin's window attention:
    each row's windows are contiguous), so each row's elements are one contiguous block."""
    lead = x.shape[0]
    if x.dim() < 2 or lead % ctx.n:
        raise ValueError(f"AdapterBank.rows: a served layer got input of shape {tuple(x.shape)} for a batch of "
                         f"{ctx.n} rows; its leading dimension must hold the rows")
    idx = ctx.idx
    xr = x.reshape(ctx.n, -1, x.shape[-1])  # (B, M, d_in)
    w1 = first.index_select(0, idx)  # (B, d_in, h)
    z = torch.bmm(xr, w1) if first_bias is None else torch.baddbmm(first_bias.index_select(0, idx), xr, w1)
    if act is not None:
        z = act(z)
    w2 = second.index_select(0, idx)  # (B, h, d_out)
    out = torch.bmm(z, w2) if second_bias is None else torch.baddbmm(second_bias.index_select(0, idx), z, w2)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclasses.dataclass(frozen=True)
class _LoraStacks:
    """One peft `lora.Linear`: per method key, A^T (K, d_in, r) and scaling * B^T (K, r, d_out)."""

    pairs: tuple[tuple[str, torch.Tensor, torch.Tensor], ...]

    def __call__(self, ctx, layer, x, *args, **kwargs):
        if layer.merged:
            raise ValueError("AdapterBank: a LoRA layer was merged into its base weights; serve an unmerged model")
        result = layer.base_layer(x, *args, **kwargs)
        if layer.disable_adapters:
            return result
        dtype = result.dtype
        for key, a, b in self.pairs:
            if key in layer.active_adapters:
                xa = layer.lora_dropout[key](x.to(a.dtype))  # as peft: the input in the LoRA weights' dtype
                result = result + _per_row(ctx, xa, a, b)
        return result.to(dtype)


@dataclasses.dataclass(frozen=True)
class _AdapterStacks:
    """One bottleneck adapter: down^T (K, d_in, b) + bias (K, 1, b), f_k up^T (K, b, d_out) + f_k bias,
    where f_k = scale_k / the module's scale (its exit hook multiplies the delta by its own scale)."""

    down: torch.Tensor
    down_bias: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor

    def __call__(self, ctx, mod, h):
        return _per_row(ctx, h.to(self.down.dtype), self.down, self.up, self.down_bias, self.up_bias, act=mod.act)


@dataclasses.dataclass(frozen=True)
class _HeadStacks:
    """A head: one rebuilt head per adapter, applied per group of rows (None: the live head)."""

    heads: tuple[nn.Module, ...] | None

    def __call__(self, ctx, head, tokens, *args, **kwargs):
        if self.heads is None:
            return type(head).forward(head, tokens, *args, **kwargs)
        if tokens.x.shape[0] != ctx.n:
            raise ValueError(f"AdapterBank.rows: {ctx.n} adapter names for a batch of {tokens.x.shape[0]} rows")
        out = None
        for k in torch.unique(ctx.idx).tolist():  # heads are small: one call per adapter present
            sel = (ctx.idx == k).nonzero().squeeze(1)
            sub = tokens._replace(x=tokens.x[sel], mask=None if tokens.mask is None else tokens.mask[sel])
            o = self.heads[k](sub, *args, **kwargs)
            if out is None:
                out = o.new_empty((ctx.n, *o.shape[1:]))
            out[sel] = o
        return out


@dataclasses.dataclass(frozen=True)
class _Site:
    """A served module and the names of its adapter tensors."""

    module: nn.Module
    kind: str  # "lora" | "adapter"
    names: dict[str, tuple[str, ...]]  # method key -> tensor names (lora: A, B; adapter: down w, b, up w, b)


def _signature(method) -> dict[str, Any]:
    skip = SERVED.get(type(method), ())
    return {k: v for k, v in method.to_dict().items() if k not in skip}


def _describe(methods) -> str:
    return ", ".join(f"{k}: " + " ".join(f"{f}={v}" for f, v in _signature(m).items() if f != "name") for k, m in methods)


class AdapterBank:
    """K adapters of one attached model, served per row (see the module docstring).

    `adapters`: {name: bundle reference (folder, catalogue name, hf://...) or state dict}. A bundle's
    methods must be the model's (scaling aside), its tensors the model's names and shapes, its
    backbone fingerprint the model's (unless `check_fingerprint=False`); a head in the bundles needs a
    `Classifier` whose head has the same configuration. Bad input raises one line naming the adapter
    and the file or field; nothing is added then.
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, Any] | None = None, check_fingerprint: bool = True):
        from .core import split

        self.model = model
        self.backbone, self.head = split(model)
        self.check_fingerprint = check_fingerprint
        self.state = state_of(self.backbone)
        self.methods = list(self.state.methods)  # what the sites below were found for
        self._check_unmerged()
        unsupported = [f"{k} ({m.name})" for k, m in self.state.methods if not self._served(m)]
        if unsupported:
            raise ValueError(f"AdapterBank: methods {', '.join(unsupported)} are not served; a bank serves LoRA "
                             f"(bias='none') and bottleneck adapters (parallel or sequential, train_norms=False)")
        self.sites = self._find_sites()
        live = trained_tensors(self.backbone)
        covered = {n for s in self.sites for names in s.names.values() for n in names}
        stray = sorted(set(live) - covered)
        if stray:
            raise ValueError(f"AdapterBank: trained tensors {stray[:3]} belong to no served layer; cannot serve them per row")
        self.shapes = {n: tuple(t.shape) for n, t in live.items()}
        self.head_shapes = {n: tuple(t.shape) for n, t in self.head.state_dict().items()} if self.head is not None else {}
        self.states: dict[str, dict[str, torch.Tensor]] = {}
        self.head_states: dict[str, dict[str, torch.Tensor] | None] = {}
        self.factors: dict[str, dict[str, float]] = {}  # name -> method key -> scaling / the model's scaling
        self._lock = threading.Lock()
        self._plan: tuple[Any, ...] | None = None
        for name, source in (adapters or {}).items():  # every adapter checked before the model is touched
            self.add(name, source)
        blocks = anatomy(self.backbone).blocks()
        served = [(s.module, "forward" if s.kind == "lora" else "delta") for s in self.sites]
        served += [(self.head, "forward")] if self.head is not None else []
        for check_only in (True, False):
            for module, attr in served:
                _serve(module, attr, check_only)
        for block in blocks:
            if _check_block_rows not in block._forward_pre_hooks.values():
                block.register_forward_pre_hook(_check_block_rows, with_kwargs=True)

    # ------------------------------------------------------------------------------- adapters

    @property
    def names(self) -> list[str]:
        return list(self.states)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter tensors now in the model (by `trained_tensors` name)."""
        return {k: v.detach().clone() for k, v in trained_tensors(self.backbone).items()}

    def add(self, name: str, source: Any = None) -> None:
        """Add (or replace) adapter `name`: a bundle reference, a state dict, or None for a snapshot of
        the adapter now in the model. Everything is checked before the bank changes."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"AdapterBank: adapter names must be non-empty strings, got {name!r}")
        if source is None:
            live = {f"backbone.{k}": v for k, v in self.snapshot().items()}
            live.update({f"head.{k}": v for k, v in (self._live_head_state() or {}).items()})
            tensors, head, factors = self._from_state(name, live, f"adapter {name!r} (the model's own)")
        elif isinstance(source, (str, os.PathLike)):
            tensors, head, factors = self._from_bundle(name, source)
        elif isinstance(source, Mapping):
            tensors, head, factors = self._from_state(name, source, f"adapter {name!r}")
        else:
            raise ValueError(f"AdapterBank: adapter {name!r}: expected a bundle reference or a state dict, "
                             f"got {type(source).__name__}")
        with self._lock:
            self.states[name] = tensors
            self.head_states[name] = head
            self.factors[name] = factors
            self._plan = None

    def remove(self, name: str) -> None:
        self._known([name])
        with self._lock:
            for d in (self.states, self.head_states, self.factors):
                del d[name]
            self._plan = None

    def use(self, name: str) -> None:
        """Copy adapter `name`'s tensors into the model (no reload): plain forwards then use it."""
        self._known([name])
        self._check_unmerged()
        odd = {k: f for k, f in self.factors[name].items() if f != 1.0}
        if odd:
            raise ValueError(f"AdapterBank.use: adapter {name!r} scales method(s) {sorted(odd)} differently from the "
                             f"model's config; serve it through rows() instead")
        live = trained_tensors(self.backbone)
        with torch.no_grad():
            for k, v in self.states[name].items():
                live[k].copy_(v)
            if self.head is not None and self.head_states[name] is not None:
                self.head.load_state_dict(self.head_states[name])

    # ---------------------------------------------------------------------------------- serving

    @contextlib.contextmanager
    def rows(self, adapters: Sequence[str]) -> Iterator[None]:
        """A context in which the model's forwards answer row i through adapter `adapters[i]`."""
        if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
            raise ValueError(f"AdapterBank.rows: expected a non-empty list of adapter names, one per row, got {adapters!r}")
        self._known(adapters)
        self._check_unmerged()
        order, sites, device = self._current_plan()
        idx = torch.tensor([order[a] for a in adapters], dtype=torch.long, device=device)
        token = _ROWS.set(_Rows(idx, len(adapters), sites))
        try:
            yield
        finally:
            _ROWS.reset(token)

    def __call__(self, *args, adapters: Sequence[str], **kwargs):
        """`model(*args, **kwargs)` with row i through adapter `adapters[i]`."""
        with self.rows(adapters):
            return self.model(*args, **kwargs)

    # -------------------------------------------------------------------------------- internals

    @staticmethod
    def _served(m) -> bool:
        if type(m) is LoRA:
            return m.bias == "none"
        return type(m) is Adapter and m.kind == "bottleneck" and not m.train_norms

    def _check_unmerged(self) -> None:
        if self.state.merged:
            raise ValueError(f"AdapterBank: methods {self.state.merged} were merged into the backbone weights; a bank "
                             f"serves an unmerged model (load the adapters into a fresh backbone)")
        if self.state.methods != self.methods:
            raise ValueError("AdapterBank: methods were attached to the model after the bank was made; make a new bank")

    def _known(self, names: Sequence[str]) -> None:
        unknown = sorted({a for a in names if a not in self.states}, key=str)
        if unknown:
            raise ValueError(f"AdapterBank: unknown adapter(s) {unknown}; the bank holds "
                             f"{', '.join(self.states) or 'no adapters'}")

    def _find_sites(self) -> list[_Site]:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        keys = {k: m for k, m in self.state.methods}
        lora_keys = [k for k, m in self.state.methods if type(m) is LoRA]
        adapter_modules = {module_name(k, p): k for k, m in self.state.methods if type(m) is Adapter
                           for p in ("mhsa", "ffn")}
        sites = []
        for name, mod in self.backbone.named_modules():
            if isinstance(mod, LoraLayer):
                mine = [k for k in lora_keys if k in mod.lora_A]
                if not mine:
                    continue
                if not isinstance(mod, LoraLinear):
                    raise ValueError(f"AdapterBank: {name} is a peft {type(mod).__name__}; only LoRA on Linear layers is served")
                for k in mine:
                    if k in mod.lora_variant or mod.lora_bias.get(k) or mod.use_rslora.get(k):
                        raise ValueError(f"AdapterBank: {name}: LoRA {k} uses a peft variant (DoRA, lora_bias or "
                                         f"rsLoRA); only plain LoRA is served")
                sites.append(_Site(mod, "lora", {k: (f"{name}.lora_A.{k}.weight", f"{name}.lora_B.{k}.weight")
                                                 for k in mine}))
            elif isinstance(mod, Bottleneck) and name.rpartition(".")[2] in adapter_modules:
                k = adapter_modules[name.rpartition(".")[2]]
                if not isinstance(mod.down, nn.Linear) or not isinstance(mod.up, nn.Linear) or mod.scale == 0:
                    raise ValueError(f"AdapterBank: {name}: adapter {k} ({keys[k].name}) is not a plain bottleneck "
                                     f"with a non-zero scale; it cannot be served")
                sites.append(_Site(mod, "adapter", {k: tuple(f"{name}.{p}.{t}" for p in ("down", "up")
                                                             for t in ("weight", "bias"))}))
        return sites

    def _live_head_state(self):
        if self.head is None:
            return None
        return {k: v.detach().clone() for k, v in self.head.state_dict().items()}

    def _from_state(self, name: str, source: Mapping, where: str, factors: dict[str, float] | None = None):
        tensors = dict(source)
        if any(not isinstance(k, str) or not torch.is_tensor(v) for k, v in tensors.items()):
            raise ValueError(f"AdapterBank: {where}: a state dict maps tensor names to tensors")
        if tensors and all(k.startswith(("backbone.", "head.")) for k in tensors):  # a bundle's names
            head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
            tensors = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        else:
            head = {}
        _check_names(where, tensors, self.shapes, "the model's")
        if head and self.head is None:
            raise ValueError(f"AdapterBank: {where} has a head but the bank's model has none; load one bundle with "
                             f"peft.load (a Classifier) and serve that")
        if self.head is not None and head:
            _check_names(where + " head", head, self.head_shapes, "the model head's")
        others = [h is not None for n, h in self.head_states.items() if n != name]
        if self.head is not None and others and any(others) != bool(head):
            raise ValueError(f"AdapterBank: {where} has {'a' if head else 'no'} head, the bank's other adapters "
                             f"{'have none' if head else 'have theirs'}; serve adapters with heads or without")
        tensors = {k: v.detach().clone() for k, v in tensors.items()}
        head = {k: v.detach().clone() for k, v in head.items()} or None
        return tensors, head, factors or {k: 1.0 for k, _ in self.state.methods}

    def _from_bundle(self, name: str, ref):
        from .base import from_dict

        path = resolve(ref)
        meta = read_meta(path)
        where = f"adapter {name!r} ({path})"
        try:
            methods = [(m.get("key"), from_dict({k: v for k, v in m.items() if k != "key"})) for m in meta["methods"]]
        except (ValueError, TypeError, AttributeError) as e:
            raise BundleError(f"AdapterBank: {path / META}: {e}") from None
        mine = self.state.methods
        if [k for k, _ in methods] != [k for k, _ in mine] or any(
                type(a) is not type(b) or _signature(a) != _signature(b) for (_, a), (_, b) in zip(methods, mine)):
            raise BundleError(f"AdapterBank: {where}: its methods [{_describe(methods)}] are not the model's "
                              f"[{_describe(mine)}]; a bank serves adapters of one method and shape (different ranks "
                              f"or methods per row are not supported)")
        want, got = self.state.fingerprint, (meta.get("backbone") or {}).get("fingerprint")
        if self.check_fingerprint and want and got and want != got:
            raise BundleError(f"AdapterBank: {where}: trained on a backbone with weights fingerprint {got}, the bank's "
                              f"model has {want} (pass check_fingerprint=False to serve it anyway)")
        head_cfg = meta.get("head")
        if head_cfg is not None and self.head is not None and head_cfg != self.head.config():
            raise BundleError(f"AdapterBank: {where}: head {head_cfg} differs from the model's {self.head.config()}")
        tensors = read_checked_tensors(Path(path) / TENSORS, meta["sha256"])
        factors = {}
        for (key, theirs), (_, ours) in zip(methods, mine):
            field = "alpha" if type(ours) is LoRA else "scale"
            factors[key] = float(getattr(theirs, field)) / float(getattr(ours, field))
        return self._from_state(name, tensors, where, factors)

    def _current_plan(self):
        """(name -> index, {id(module): stacks}, device), rebuilt when adapters or devices changed."""
        with self._lock:
            where = tuple((p.device, p.dtype) for s in self.sites for p in _ref_params(s))
            if self.head is not None:
                where += tuple((p.device, p.dtype) for p in list(self.head.parameters())[:1])
            if self._plan is None or self._plan[0] != where:
                self._plan = (where, *self._build())
            return self._plan[1:]

    def _build(self):
        order = {n: i for i, n in enumerate(self.states)}
        names = list(self.states)
        sites: dict[int, Any] = {}
        device = None
        for s in self.sites:
            if s.kind == "lora":
                pairs = []
                for key, (a_name, b_name) in s.names.items():
                    ref = s.module.lora_A[key].weight
                    device = device or ref.device
                    scale = [float(s.module.scaling[key]) * self.factors[n][key] for n in names]
                    a = torch.stack([self.states[n][a_name] for n in names]).to(ref.device, ref.dtype)  # (K, r, d_in)
                    b = torch.stack([self.states[n][b_name].float() * c for n, c in zip(names, scale)])  # (K, d_out, r)
                    pairs.append((key, a.transpose(1, 2).contiguous(), b.to(ref.device, ref.dtype).transpose(1, 2).contiguous()))
                sites[id(s.module)] = _LoraStacks(tuple(pairs))
            else:
                (key, (dw, db, uw, ub)), = s.names.items()
                ref = s.module.down.weight
                device = device or ref.device
                f = torch.tensor([self.factors[n][key] for n in names], dtype=torch.float32)
                down, up = _stack(self.states, names, dw, ref), _stack(self.states, names, uw, ref, f)
                sites[id(s.module)] = _AdapterStacks(
                    down.transpose(1, 2).contiguous(), _stack(self.states, names, db, ref).unsqueeze(1),
                    up.transpose(1, 2).contiguous(), _stack(self.states, names, ub, ref, f).unsqueeze(1))
        if self.head is not None:
            heads = None
            if names and self.head_states[names[0]] is not None:
                from shared.heads import build_head

                ref = next(iter(self.head.parameters()), None)
                heads = []
                for n in names:
                    h = build_head(self.head.config())
                    h.load_state_dict(self.head_states[n])
                    heads.append(h.to(*((ref.device, ref.dtype) if ref is not None else ())).train(self.head.training))
                heads = tuple(heads)
            sites[id(self.head)] = _HeadStacks(heads)
        if device is None:
            device = next(self.backbone.parameters()).device
        return order, sites, device


def _stack(states, names, tensor: str, ref: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """(K, ...) tensor `tensor` of every adapter, each times its factor, in `ref`'s device and dtype."""
    x = torch.stack([states[n][tensor].float() for n in names])
    if factor is not None:
        x = x * factor.reshape(-1, *[1] * (x.dim() - 1))
    return x.to(ref.device, ref.dtype)


def _ref_params(site: _Site):
    if site.kind == "lora":
        return [site.module.lora_A[k].weight for k in site.names]
    return [site.module.down.weight]


def _check_names(where: str, got: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]], whose: str) -> None:
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in set(got) & set(want) if tuple(got[k].shape) != want[k])
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                 "shape " + ", ".join(f"{k}: {tuple(got[k].shape)} vs {whose} {want[k]}" for k in wrong[:3]) if wrong else ""]
        raise ValueError(f"AdapterBank: {where} does not fit the bank's model (a bank serves adapters of one method and "
                         f"shape): " + "; ".join(p for p in parts if p))


__all__ = ["AdapterBank"]
