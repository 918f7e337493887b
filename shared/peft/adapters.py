"""Modules attached at a block's sublayers: bottleneck / conformer / convpass adapters, Compacter, FiLM.

Each attached module hooks its sublayer as the anatomy describes it (see `Sublayer`):
- parallel:   out = exit(...) + scale * f(sublayer input)      (reads the entry's input)
- sequential: out = y + scale * f(y),  y = exit(...)            (adapter with residual)
The last projection of every adapter is zero-initialised, so the model is unchanged at init
(the PETL-AST code zero-inits both projections, which leaves the down projection without
gradient; we zero only the up projection).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from shared.backbones import Anatomy, Sublayer, square_grid

from .base import Method, check_choice, check_positive, register

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "identity": nn.Identity}
PLACEMENT_CHOICES = ("mhsa", "ffn", "both")


def _placements(placement: str) -> tuple[str, ...]:
    return ("mhsa", "ffn") if placement == "both" else (placement,)


def module_name(key: str, placement: str) -> str:
    return f"peft_{key}_{placement}"


# The sublayer input a parallel module reads, held between the entry and exit hooks of one
# forward. The slot is private to the calling thread and emptied by the exit hook, so concurrent
# forwards on one model (threads, a server answering several requests) never see each other's
# inputs. Keyed by module id; kept off the module so models stay deep-copyable and picklable.
_INPUTS = threading.local()


def _slots() -> dict[int, torch.Tensor]:
    d = getattr(_INPUTS, "slots", None)
    if d is None:
        d = _INPUTS.slots = {}
    return d


def hooks_of(owner: nn.Module, model: nn.Module):
    """(module, hook dict, hook id) for every forward / pre-forward hook of `model` bound to `owner`,
    wherever it lives now (a merged peft layer hands its hooks to its base layer)."""
    for m in model.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for hid, fn in list(hooks.items()):
                if getattr(fn, "__self__", None) is owner:
                    yield m, hooks, hid


class SublayerModule(nn.Module):
    """Base of every module that hooks one sublayer (parallel or sequential).

    The delta joins the sublayer's output where the residual add receives it (`Sublayer.output`:
    after LayerScale, before drop-path). Parallel modules read the sublayer input at the entry
    layer; the forward is stateless across calls (see `_INPUTS`).
    """

    def __init__(self, mode: str, scale: float = 1.0):
        super().__init__()
        self.mode, self.scale = mode, scale

    @property
    def additive(self) -> bool:
        """True when the hook only adds a term that does not depend on the hooked output."""
        return self.mode == "parallel"

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} must define delta()")

    def install(self, sub: Sublayer) -> None:
        ref = sub.exit.weight
        self.to(device=ref.device, dtype=ref.dtype)  # join the layer's dtype and device
        if self.mode == "parallel":
            sub.entry.register_forward_pre_hook(self._capture)
        sub.output.register_forward_hook(self._on_exit)

    def exit_site(self, model: nn.Module) -> nn.Module:
        """The module whose output this module changes (its exit hook's current home)."""
        for m, hooks, _ in hooks_of(self, model):
            if hooks is m._forward_hooks:
                return m
        raise RuntimeError(f"{type(self).__name__}: its exit hook is not installed in this model")

    def uninstall(self, model: nn.Module) -> None:
        for _, hooks, hid in list(hooks_of(self, model)):
            del hooks[hid]

    def _capture(self, module, args):
        _slots()[id(self)] = args[0]

    def _on_exit(self, module, args, out):
        y = out[0] if isinstance(out, tuple) else out
        if self.mode == "parallel":
            h = _slots().pop(id(self), None)
            if h is None:
                raise RuntimeError("parallel adapter: the sublayer's entry layer did not run before its exit")
            y = y + self.scale * self.delta(h)
        else:
            y = y + self.scale * self.delta(y)
        return (y, *out[1:]) if isinstance(out, tuple) else y


class Linear(nn.Linear):
    """nn.Linear whose init can be zero (the adapter's last projection)."""

    def __init__(self, d_in: int, d_out: int, zero: bool = False):
        super().__init__(d_in, d_out)
        if zero:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)


class Bottleneck(SublayerModule):
    """down (d_in -> b) -> activation -> up (b -> d_out, zero-init)."""

    def __init__(self, d_in, d_out, b, mode, scale=1.0, activation="gelu", linear=Linear):
        super().__init__(mode, scale)
        self.down = linear(d_in, b)
        self.act = ACTIVATIONS[activation]()
        self.up = linear(b, d_out, zero=True)

    def delta(self, h):
        return self.up(self.act(self.down(h)))


class Conformer(SublayerModule):
    """Conformer convolution module as an adapter (PETL-AST), zero-init output projection.

    LayerNorm -> pointwise to 2b -> GLU -> depthwise conv over tokens -> BatchNorm -> SiLU ->
    pointwise to d_out. The anchor discards the LayerNorm's output; we apply it.
    """

    def __init__(self, d_in, d_out, b, mode, scale=1.0, kernel_size=31):
        super().__init__(mode, scale)
        self.norm = nn.LayerNorm(d_in)
        self.pw1 = nn.Linear(d_in, 2 * b)
        self.dw = nn.Conv1d(b, b, kernel_size, padding=kernel_size // 2, groups=b)
        self.bn = nn.BatchNorm1d(b)
        self.pw2 = Linear(b, d_out, zero=True)

    def delta(self, h):
        lead = h.shape[:-2]
        x = F.glu(self.pw1(self.norm(h.reshape(-1, *h.shape[-2:]))), dim=-1)  # (B', N, b)
        x = F.silu(self.bn(self.dw(x.transpose(1, 2)))).transpose(1, 2)  # conv over tokens
        return self.pw2(x).reshape(*lead, *x.shape[-2:-1], -1)


class Convpass(SublayerModule):
    """Convolutional bypass (Jie & Deng 2022): down -> GELU -> 3x3 conv on the patch grid -> GELU -> up.

    Non-grid tokens (CLS, registers, prompts) pass through the same conv as 1x1 images.
    """

    def __init__(self, d_in, d_out, b, mode, scale=1.0, layout=None):
        super().__init__(mode, scale)
        self.down = nn.Linear(d_in, b)
        self.conv = nn.Conv2d(b, b, 3, padding=1)
        self.up = Linear(b, d_out, zero=True)
        self._layout = layout  # n tokens -> (num non-grid tokens, (H, W))

    def delta(self, h):
        lead, n = h.shape[:-2], h.shape[-2]
        x = F.gelu(self.down(h.reshape(-1, n, h.shape[-1])))  # (B', N, b)
        p, (gh, gw) = self._layout(n) if self._layout else (0, square_grid(n))
        grid = x[:, p:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        grid = self.conv(grid).flatten(2).transpose(1, 2)  # (B', H*W, b)
        if p:
            pre = self.conv(x[:, :p].transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
            grid = torch.cat([pre, grid], dim=1)
        return self.up(F.gelu(grid)).reshape(*lead, n, -1)


class FiLMModule(SublayerModule):
    """Per-channel scale and shift of the sublayer output: y * gamma + beta (identity at init)."""

    def __init__(self, d_out):
        super().__init__("sequential")
        self.gamma = nn.Parameter(torch.ones(d_out))
        self.beta = nn.Parameter(torch.zeros(d_out))

    def _on_exit(self, module, args, out):
        y = out[0] if isinstance(out, tuple) else out
        y = y * self.gamma + self.beta
        return (y, *out[1:]) if isinstance(out, tuple) else y


# --- Compacter ---------------------------------------------------------------------------------
class PHMShared(nn.Module):
    """Compacter's "slow" weights: n matrices A_i (n x n) shared by every PHM layer of the model,
    down and up projections alike (AdapterHub's `shared_phm_rule`).

    Init: Xavier-normal, not AdapterHub's N(0, 1e-4). Our up projection's fast weights start at
    zero so the model is exactly unchanged at init; with A_i ~ 1e-4 on top of that, the first
    gradients of every fast weight are ~1e-17 (measured on the tiny ViT), far below AdamW's eps,
    and the adapter would not learn (AdapterHub avoids this by starting near, not at, identity).
    """

    def __init__(self, n: int):
        super().__init__()
        self.rule = nn.Parameter(torch.empty(n, n, n))
        nn.init.xavier_normal_(self.rule)


class PHMLinear(nn.Module):
    """Parameterised hypercomplex multiplication: W = sum_i A_i (x) (s_i t_i^T), rank-one fast weights."""

    def __init__(self, d_in, d_out, shared: PHMShared, zero: bool = False):
        super().__init__()
        n = shared.rule.shape[0]
        if d_in % n or d_out % n:
            raise ValueError(f"compacter: widths {d_in} and {d_out} must be divisible by phm_dim={n}")
        self.n = n
        self._shared = (shared,)  # a tuple, so the shared module is not registered twice
        self.s = nn.Parameter(torch.randn(n, d_in // n) / math.sqrt(d_in))
        self.t = nn.Parameter(torch.zeros(n, d_out // n) if zero else torch.randn(n, d_out // n) / math.sqrt(d_out // n))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def weight(self) -> torch.Tensor:
        a = self._shared[0].rule  # (n, n, n)
        b = torch.einsum("ic,id->icd", self.s, self.t)  # rank-one fast weights (n, in/n, out/n)
        w = torch.einsum("iab,icd->acbd", a, b)  # sum_i kron(A_i, B_i)
        return w.reshape(self.n * self.s.shape[1], self.n * self.t.shape[1])  # (in, out)

    def forward(self, x):
        return x @ self.weight() + self.bias


# --- configs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sublayers(Method):
    """Fields and helpers shared by methods that attach one module per adapted sublayer."""

    placement: str = "ffn"
    blocks: tuple[int, ...] | None = None  # block indices to adapt; None = all

    def __post_init__(self):
        check_choice("placement", self.placement, PLACEMENT_CHOICES)
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def sites(self, anat: Anatomy):
        blocks = anat.blocks()
        chosen = range(len(blocks)) if self.blocks is None else self.blocks
        seen: dict[int, int] = {}
        for i in chosen:
            if isinstance(i, bool) or not isinstance(i, int) or not -len(blocks) <= i < len(blocks):
                raise ValueError(f"{self.name}: block index {i!r} out of range for {len(blocks)} blocks")
            j = i % len(blocks)
            if j in seen:
                raise ValueError(f"{self.name}: blocks {seen[j]} and {i} are the same block (of {len(blocks)}); "
                                 "list each block once")
            seen[j] = i
        for j in seen:
            for placement in _placements(self.placement):
                yield blocks[j], placement, anat.sublayer(blocks[j], placement)

    def _attached(self, model, anat, key):
        for block, placement, sub in self.sites(anat):
            yield block, placement, sub, getattr(block, module_name(key, placement))

    def merge_phase(self, model, anat, key) -> int:
        """0 when a hook sits on the base layer inside a peft layer (it must be folded before that
        peft layer merges into the base), else 2 (after the peft methods)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        bases = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, BaseTunerLayer)}
        inner = any(id(mod.exit_site(model)) in bases for *_, mod in self._attached(model, anat, key))
        return 0 if inner else 2


@dataclass(frozen=True)
class _AdapterBase(_Sublayers):
    mode: str = "parallel"
    bottleneck: int | None = None
    reduction: float | None = None  # PETL-AST's RR: bottleneck = round(dim / reduction)
    scale: float = 1.0
    train_norms: bool = False  # PETL-AST: also train the norms of adapted sublayers + final norm

    def __post_init__(self):
        super().__post_init__()
        check_choice("mode", self.mode, ("parallel", "sequential"))
        if self.bottleneck is not None and self.reduction is not None:
            raise ValueError(f"{self.name}: give bottleneck or reduction, not both")
        check_positive("bottleneck", self.bottleneck, allow_none=True)
        check_positive("reduction", self.reduction, allow_none=True)

    def width(self, dim: int) -> int:
        if self.bottleneck is not None:
            return int(self.bottleneck)
        return max(1, round(dim / (self.reduction or 12)))

    def build(self, d_in, d_out, anat, shared: dict[str, nn.Module], key) -> SublayerModule:
        """One module for one sublayer; `shared` collects modules to register once on the model."""
        raise TypeError(f"{type(self).__name__} must define build()")

    def attach(self, model, anat, key):
        # Build everything first so that a bad config raises before the model is touched.
        shared: dict[str, nn.Module] = {}
        plan = []
        for block, placement, sub in list(self.sites(anat)):
            d_in = sub.entry.in_features if self.mode == "parallel" else sub.exit.out_features
            plan.append((block, placement, sub, self.build(d_in, sub.exit.out_features, anat, shared, key)))
        for name, mod in shared.items():
            ref = plan[0][2].exit.weight
            model.add_module(name, mod.to(device=ref.device, dtype=ref.dtype))
        extra = []
        for block, placement, sub, mod in plan:
            block.add_module(module_name(key, placement), mod)
            mod.install(sub)
            if self.train_norms and sub.norm is not None:
                extra += list(sub.norm.parameters())
        if self.train_norms and anat.final_norm() is not None:
            extra += list(anat.final_norm().parameters())
        return extra


@register
@dataclass(frozen=True)
class Adapter(_AdapterBase):
    """Bottleneck / conformer / convpass adapter at the MHSA and/or FFN sublayer.

    Pfeiffer = placement "ffn"; Houlsby = placement "both". Size: `bottleneck` (absolute) or
    `reduction` (bottleneck = round(dim / reduction)); default reduction 12.
    """

    name: ClassVar[str] = "adapter"
    kind: str = "bottleneck"
    activation: str = "gelu"
    kernel_size: int = 31  # conformer's depthwise kernel

    def __post_init__(self):
        super().__post_init__()
        check_choice("kind", self.kind, ("bottleneck", "conformer", "convpass"))
        check_choice("activation", self.activation, tuple(ACTIVATIONS))

    def build(self, d_in, d_out, anat, shared, key):
        b = self.width(d_out)
        if self.kind == "conformer":
            return Conformer(d_in, d_out, b, self.mode, self.scale, self.kernel_size)
        if self.kind == "convpass":
            return Convpass(d_in, d_out, b, self.mode, self.scale, layout=_layout(anat))
        return Bottleneck(d_in, d_out, b, self.mode, self.scale, self.activation)

    def merge(self, model, anat, key):
        if not (self.kind == "bottleneck" and self.mode == "sequential" and self.activation == "identity"):
            return ("only sequential bottleneck adapters with activation 'identity' are linear in the "
                    "exit layer's output and can be folded; this one stays attached")

        def affine(mod):  # out = (I + sUD) y + s(U d_b + u_b)
            up, down = mod.up.weight.detach(), mod.down.weight.detach()
            m = torch.eye(up.shape[0], device=up.device, dtype=up.dtype) + self.scale * up @ down
            return m, self.scale * (up @ mod.down.bias.detach() + mod.up.bias.detach())

        return _fold_all(self, model, anat, key, affine)


def _layout(anat: Anatomy):
    """n tokens -> (leading non-grid tokens, grid), from the anatomy's patch grid when it fits."""
    grid, prefix = anat.grid(), anat.num_prefix_tokens

    def layout(n: int):
        if grid is not None and n >= grid[0] * grid[1] and n - grid[0] * grid[1] >= prefix:
            return n - grid[0] * grid[1], grid  # prompts sit between prefix and patches
        if grid is None and 0 < prefix < n:
            return prefix, (n - prefix, 1)  # 1-D sequences: a column
        return 0, square_grid(n)  # Swin windows and merged stages

    return layout


def _fold_affine(linear: nn.Linear, m: torch.Tensor, shift: torch.Tensor) -> None:
    """Replace y = W x + b by y' = M y + shift, in place."""
    with torch.no_grad():
        m = m.to(linear.weight)
        linear.weight.copy_(m @ linear.weight)
        b = linear.bias if linear.bias is not None else torch.zeros_like(shift)
        new_b = m @ b + shift.to(b)
        if linear.bias is None:
            linear.bias = nn.Parameter(new_b, requires_grad=False)
        else:
            linear.bias.copy_(new_b)


def _fold_target(model: nn.Module, sub: Sublayer, mod: SublayerModule) -> nn.Linear | str:
    """The Linear that `mod`'s affine exit hook can be folded into, or why there is none.

    The hook lives on the exit Linear itself or on the output module after it (LayerScale, or an
    Identity where there is none); a LayerScale is first absorbed into the Linear (gamma -> 1).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    site = mod.exit_site(model)
    first = next(iter(site._forward_hooks.values()))
    if getattr(first, "__self__", None) is not mod:
        return (f"another method's hook on {type(site).__name__} runs before it and stays attached, "
                "so it cannot be folded into the weights")
    target = site
    if not isinstance(site, nn.Linear):
        target = sub.exit
        if target._forward_hooks:
            return f"the exit layer {type(target).__name__} carries another method's hook; it stays attached"
    if isinstance(target, BaseTunerLayer) or not isinstance(target, nn.Linear):
        return (f"its exit layer is a {type(target).__name__} (an unmerged peft layer?); "
                "merge that method first or leave both attached")
    gamma = getattr(site, "gamma", None) if site is not target else None
    if isinstance(gamma, torch.Tensor):  # absorb LayerScale into the Linear: W <- diag(g) W
        with torch.no_grad():
            target.weight.mul_(gamma.reshape(-1, 1).to(target.weight))
            if target.bias is not None:
                target.bias.mul_(gamma.to(target.bias))
            gamma.fill_(1.0)
    return target


def _fold_all(method, model, anat, key, affine) -> str | None:
    """Fold every site's affine map (M, shift) = affine(module) and unhook it; or say why not."""
    plan = []
    for _, _, sub, mod in method._attached(model, anat, key):
        target = _fold_target(model, sub, mod)
        if isinstance(target, str):
            return target
        plan.append((target, mod))
    for target, mod in plan:
        m, shift = affine(mod)
        _fold_affine(target, m, shift)
        mod.uninstall(model)
    return None


@register
@dataclass(frozen=True)
class Compacter(_AdapterBase):
    """Bottleneck adapter whose projections are PHM layers (Mahabadi et al. 2021).

    The n "slow" matrices A_i are shared by all adapters of the model; each layer learns
    rank-one "fast" factors. Widths must be divisible by `phm_dim`.
    """

    name: ClassVar[str] = "compacter"
    phm_dim: int = 4
    activation: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        check_positive("phm_dim", self.phm_dim)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))

    def build(self, d_in, d_out, anat, shared, key):
        name = f"peft_{key}_shared"
        if name not in shared:
            shared[name] = PHMShared(self.phm_dim)
        slow = shared[name]

        def linear(i, o, zero=False):
            return PHMLinear(i, o, slow, zero=zero)

        b = self.width(d_out)
        b = max(self.phm_dim, b - b % self.phm_dim)  # PHM needs widths divisible by n
        return Bottleneck(d_in, d_out, b, self.mode, self.scale, self.activation, linear=linear)


@register
@dataclass(frozen=True)
class FiLM(_Sublayers):
    """Feature-wise linear modulation of sublayer outputs: y * gamma + beta, per channel."""

    name: ClassVar[str] = "film"

    def attach(self, model, anat, key):
        for block, placement, sub in list(self.sites(anat)):
            mod = FiLMModule(sub.exit.out_features)
            block.add_module(module_name(key, placement), mod)
            mod.install(sub)
        return ()

    def merge(self, model, anat, key):
        return _fold_all(self, model, anat, key,
                         lambda mod: (torch.diag(mod.gamma.detach()), mod.beta.detach()))
