"""Hypernetwork adapters: hyperformer-style HyperAdapter, Polyhistor and Polyhistor-Lite.

One shared hypernetwork per model emits every adapted sublayer's bottleneck-adapter weights from
a task embedding z_t (one per task) and a layer embedding l_i (one per adapted sublayer):

    s = ReLU(P [z_t ; l_i] + p)                       projector, (proj_dim,)
    HyperAdapter:   W_down = G_down s  (d_in x b)      full matrices
                    W_up   = G_up s    (b x d_out)
    Polyhistor:     W_down = (G_di s)(G_do s)          low-rank factors (d_in x r)(r x b)
                    W_up   = (G_ui s)(G_uo s)          (b x r)(r x d_out)
    PolyhistorLite: as Polyhistor, but the d-sized factors are emitted as m templates at the
                    smallest adapted width C and each layer scales them to its width d = k*C
                    with its own kernels K (m x k):  F = sum_i K_i (x) T_i   (Kronecker)
    biases:         b_down = G_bd s,  b_up = G_bu s   (separate generators; Lite: sum_i K_i (x) t_i)

Every generator G is a Linear from s (weight and bias). HyperAdapter and Polyhistor keep one
generator set per distinct (d_in, d_out, b) shape (Swin's stages C, 2C, 4C, 8C get one each);
Polyhistor-Lite keeps one set at width C for the whole model (its point: the hypernetwork does
not grow with the stage widths). Generated matrices are scaled by 1 / sqrt(fan_in) of the
product they take part in (d_in, r, b, r), so activations keep their scale at every width.
The adapter's delta is act(h W_down + b_down) W_up + b_up, joined at the sublayer output like
`Adapter` (parallel or sequential). The generators of W_up's last factor and of b_up start at
zero: identity at init.

The task is chosen per forward, never stored on a module: `with use_task(t): model(x)` sets it
in a slot private to the calling thread for the duration of the block (nestable, restored on
exit), so concurrent forwards on one model each see their own task. `use_task((t0, t1, ...))`
runs several tasks in one forward on a batch of equal chunks (chunk i with task t_i). A method
with one task needs no `use_task`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ACTIVATIONS, SublayerModule, _AdapterBase, module_name
from .base import check_choice, register, state_of

_TASK = threading.local()


def _is_index(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


@contextlib.contextmanager
def use_task(task: int | tuple[int, ...]):
    """Run the forwards inside this block with task `task` (an index) for every hypernetwork method.

    A tuple (t_0, ..., t_{k-1}) runs several tasks in one forward: the batch is k equal chunks
    along dim 0 (every hooked tensor keeps the batch leading, batch-major), chunk i with task t_i.
    """
    if isinstance(task, (list, tuple)):
        task = tuple(task)
        if not task or not all(_is_index(t) for t in task):
            raise ValueError(f"use_task: tasks must be non-negative int indices, got {task!r}")
    elif not _is_index(task):
        raise ValueError(f"use_task: the task must be a non-negative int index, got {task!r}")
    prev = getattr(_TASK, "task", None)
    _TASK.task = task
    try:
        yield task
    finally:
        _TASK.task = prev


def active_task() -> int | tuple[int, ...] | None:
    """The task set by the innermost `use_task` of the calling thread, or None."""
    return getattr(_TASK, "task", None)


class HyperShared(nn.Module):
    """Task embeddings, the projector and the generator sets (keyed by shape group)."""

    def __init__(self, cfg: "_HyperBase", groups: dict[str, tuple[int, int, int]]):
        super().__init__()
        e, p = cfg.embed_dim, cfg.proj_dim
        self.tasks = nn.ParameterList([nn.Parameter(torch.randn(e)) for _ in range(cfg.tasks)])
        self.proj = nn.Linear(2 * e, p)
        self.gens = nn.ModuleDict({g: nn.ModuleDict(cfg.generators(p, *shape)) for g, shape in groups.items()})

    def add_task(self) -> nn.Parameter:
        ref = self.tasks[0]
        t = nn.Parameter(torch.randn(ref.shape, device=ref.device, dtype=ref.dtype))
        self.tasks.append(t)
        return t


def _gen(p: int, n: int, zero: bool = False) -> nn.Linear:
    g = nn.Linear(p, n)
    if zero:
        nn.init.zeros_(g.weight)
        nn.init.zeros_(g.bias)
    return g


class HyperLayer(SublayerModule):
    """One adapted sublayer: its layer embedding (and Lite kernels); weights come from the shared net."""

    def __init__(self, cfg: "_HyperBase", shared: HyperShared, group: str, d_in: int, d_out: int, b: int,
                 scales: tuple[int, int] = (1, 1)):
        super().__init__(cfg.mode, cfg.scale)
        self.cfg, self.group = cfg, group
        self.d_in, self.d_out, self.b = d_in, d_out, b
        self._shared = (shared,)  # a tuple: the shared module is registered once, on the model
        self.layer = nn.Parameter(torch.randn(cfg.embed_dim))
        self.act = ACTIVATIONS[cfg.activation]()
        if isinstance(cfg, PolyhistorLite):
            m = cfg.templates
            self.k_in = nn.Parameter(torch.randn(m, scales[0]) / math.sqrt(m))   # scales d_in factors
            self.k_out = nn.Parameter(torch.randn(m, scales[1]) / math.sqrt(m))  # scales d_out factor + b_up

    def task_index(self) -> int | tuple[int, ...]:
        n = len(self._shared[0].tasks)
        t = active_task()
        if t is None:
            if n == 1:
                return 0
            raise RuntimeError(f"{self.cfg.name} has {n} tasks and none is selected: run the forward inside "
                               "`with shared.peft.use_task(t):`")
        if max(t if isinstance(t, tuple) else (t,)) >= n:
            raise ValueError(f"{self.cfg.name}: task {t} selected but the method has {n} tasks (0..{n - 1})")
        return t

    def weights(self, task: int | None = None) -> dict[str, torch.Tensor]:
        """The adapter weights generated for `task` (default: the active one): down (d_in, b),
        down_bias (b,), up (b, d_out), up_bias (d_out,)."""
        sh = self._shared[0]
        t = self.task_index() if task is None else task
        if isinstance(t, tuple):
            raise ValueError("weights(): give one task index")
        s = F.relu(sh.proj(torch.cat([sh.tasks[t], self.layer])))  # (p,)
        return self.cfg.generate(sh.gens[self.group], s, self)

    def delta(self, h):
        t = self.task_index()
        if not isinstance(t, tuple):
            return self.adapt(h, self.weights(t))
        if h.shape[0] % len(t):
            raise ValueError(f"{self.cfg.name}: a batch of {h.shape[0]} cannot be split into {len(t)} task chunks")
        return torch.cat([self.adapt(c, self.weights(i)) for c, i in zip(h.chunk(len(t)), t)])

    def adapt(self, h, w):
        """act(h W_down + b_down) W_up + b_up with the generated weights `w`."""
        return self.act(h @ w["down"] + w["down_bias"]) @ w["up"] + w["up_bias"]


def kron_sum(k: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    """sum_i K_i (x) T_i with K (m, s) laid along `axis` of the (m, a, c) templates T: the result
    is (s*a, c) for axis 0 (block j of rows = sum_i K[i, j] T_i) and (a, s*c) for axis 1."""
    m, s = k.shape
    if axis == 0:
        return torch.einsum("ij,iac->jac", k, t).reshape(s * t.shape[1], t.shape[2])
    return torch.einsum("ij,iac->ajc", k, t).reshape(t.shape[1], s * t.shape[2])


# --- configs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _HyperBase(_AdapterBase):
    tasks: int = 1
    embed_dim: int = 64   # task and layer embedding width
    proj_dim: int = 64    # projector output s, the generators' input
    activation: str = "gelu"  # a ReLU bottleneck of a few units can start dead on every token

    def __post_init__(self):
        super().__post_init__()
        for f in ("tasks", "embed_dim", "proj_dim"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{self.name}: {f} must be a positive int, got {v!r}")
        check_choice("activation", self.activation, tuple(ACTIVATIONS))

    # what subclasses define
    def generators(self, p: int, d_in: int, d_out: int, b: int) -> dict[str, nn.Linear]:
        raise TypeError(f"{type(self).__name__} must define generators() (HyperAdapter and Polyhistor do)")

    def generate(self, gens, s, layer: HyperLayer) -> dict[str, torch.Tensor]:
        raise TypeError(f"{type(self).__name__} must define generate() (HyperAdapter and Polyhistor do)")

    def plan(self, anat) -> list[tuple]:
        """[(block, placement, sub, d_in, d_out, b, group, scales)] for every adapted sublayer."""
        out = []
        for block, placement, sub in list(self.sites(anat)):
            d_in = sub.entry.in_features if self.mode == "parallel" else sub.exit.out_features
            d_out = sub.exit.out_features
            b = self.width(d_out)
            out.append([block, placement, sub, d_in, d_out, b, f"g{d_in}_{d_out}_{b}", (1, 1)])
        return out

    def attach(self, model, anat, key):
        plan = self.plan(anat)
        groups = {}
        for *_, d_in, d_out, b, g, _ in plan:
            groups.setdefault(g, (d_in, d_out, b))
        shared = HyperShared(self, groups)
        layers = [HyperLayer(self, shared, g, d_in, d_out, b, sc) for *_, d_in, d_out, b, g, sc in plan]
        ref = plan[0][2].exit.weight
        model.add_module(f"peft_{key}_shared", shared.to(device=ref.device, dtype=ref.dtype))
        for (block, placement, sub, *_), mod in zip(plan, layers):
            block.add_module(module_name(key, placement), mod)
            mod.install(sub)
        return ()

    def merge(self, model, anat, key):
        return (f"{self.name} generates its adapter weights from the task chosen at each forward "
                "(and they pass through a nonlinearity), so they cannot be folded into the backbone")


@register
@dataclass(frozen=True)
class HyperAdapter(_HyperBase):
    """Hyperformer-style: the hypernetwork emits full down / up matrices and biases
    (Mahabadi et al. 2021, shared hypernetworks for multi-task adapters)."""

    name: ClassVar[str] = "hyper_adapter"

    def generators(self, p, d_in, d_out, b):
        return {"down": _gen(p, d_in * b), "down_bias": _gen(p, b),
                "up": _gen(p, b * d_out, zero=True), "up_bias": _gen(p, d_out, zero=True)}

    def generate(self, gens, s, layer):
        d_in, d_out, b = layer.d_in, layer.d_out, layer.b
        return {"down": gens["down"](s).reshape(d_in, b) / math.sqrt(d_in), "down_bias": gens["down_bias"](s),
                "up": gens["up"](s).reshape(b, d_out) / math.sqrt(b), "up_bias": gens["up_bias"](s)}


@register
@dataclass(frozen=True)
class Polyhistor(_HyperBase):
    """Decomposed hypernetworks (Liu et al. 2022): low-rank factors of W_down and W_up, each from
    its own generator, plus separate bias generators. One generator set per width group."""

    name: ClassVar[str] = "polyhistor"
    rank: int = 8

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"{self.name}: rank must be a positive int, got {self.rank!r}")

    def generators(self, p, d_in, d_out, b):
        r = self.rank
        return {"down_in": _gen(p, d_in * r), "down_out": _gen(p, r * b), "down_bias": _gen(p, b),
                "up_in": _gen(p, b * r), "up_out": _gen(p, r * d_out, zero=True), "up_bias": _gen(p, d_out, zero=True)}

    def factors(self, gens, s, layer):
        """(down_in (d_in, r), up_out (r, d_out), up_bias (d_out,)): the width-sized parts."""
        r = self.rank
        return (gens["down_in"](s).reshape(layer.d_in, r), gens["up_out"](s).reshape(r, layer.d_out),
                gens["up_bias"](s))

    def generate(self, gens, s, layer):
        r, b = self.rank, layer.b
        down_in, up_out, up_bias = self.factors(gens, s, layer)
        down = (down_in / math.sqrt(layer.d_in)) @ (gens["down_out"](s).reshape(r, b) / math.sqrt(r))
        up = (gens["up_in"](s).reshape(b, r) / math.sqrt(b)) @ (up_out / math.sqrt(r))
        return {"down": down, "down_bias": gens["down_bias"](s), "up": up, "up_bias": up_bias}


@register
@dataclass(frozen=True)
class PolyhistorLite(Polyhistor):
    """Polyhistor with layer-wise scaling kernels: one generator set at the smallest adapted width C;
    a layer of width d = k*C turns the m emitted templates into its own factors with kernels
    K (m x k): F = sum_i K_i (x) T_i. The bottleneck b is the same for every layer (from C when
    given as a reduction). Every adapted width must be a multiple of C."""

    name: ClassVar[str] = "polyhistor_lite"
    templates: int = 4

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.templates, bool) or not isinstance(self.templates, int) or self.templates <= 0:
            raise ValueError(f"{self.name}: templates must be a positive int, got {self.templates!r}")

    def plan(self, anat):
        plan = super().plan(anat)
        c = min(min(row[3], row[4]) for row in plan)
        b = self.width(c)
        for row in plan:
            for d in (row[3], row[4]):
                if d % c:
                    raise ValueError(f"{self.name}: width {d} is not a multiple of the smallest adapted width {c}; "
                                     "the scaling kernels need stage widths k*C")
            row[5], row[6], row[7] = b, f"g{c}_{c}_{b}", (row[3] // c, row[4] // c)
        return plan

    def generators(self, p, d_in, d_out, b):
        g = super().generators(p, self.templates * d_in, self.templates * d_out, b)
        g["up_bias"] = _gen(p, self.templates * d_out, zero=True)
        return g

    def factors(self, gens, s, layer):
        r, m = self.rank, self.templates
        c_in, c_out = layer.d_in // layer.k_in.shape[1], layer.d_out // layer.k_out.shape[1]
        down_in = kron_sum(layer.k_in, gens["down_in"](s).reshape(m, c_in, r), axis=0)     # (d_in, r)
        up_out = kron_sum(layer.k_out, gens["up_out"](s).reshape(m, r, c_out), axis=1)     # (r, d_out)
        up_bias = kron_sum(layer.k_out, gens["up_bias"](s).reshape(m, 1, c_out), axis=1)[0]  # (d_out,)
        return down_in, up_out, up_bias


HYPER_METHODS = (HyperAdapter, Polyhistor, PolyhistorLite)


def add_task(model: nn.Module) -> int:
    """Give every hypernetwork method of `model` one more task embedding; returns its index.

    The new embedding is owned by (and trains with) its method; everything else the hypernetwork
    holds is already trained for the other tasks, so a caller adapting a new task trains only this
    embedding (and its decoder): freeze the rest with `freeze_all_but_new_task`.
    """
    from .core import split

    backbone, _ = split(model)
    state = state_of(backbone)
    index = None
    for i, (key, m) in enumerate(state.methods):
        if not isinstance(m, HYPER_METHODS):
            continue
        shared = backbone.get_submodule(f"peft_{key}_shared")
        shared.add_task()
        state.methods[i] = (key, dataclasses.replace(m, tasks=m.tasks + 1))
        name = f"peft_{key}_shared.tasks.{len(shared.tasks) - 1}"
        state.owner[name] = key
        index = len(shared.tasks) - 1
    if index is None:
        raise ValueError("add_task: the model has no hypernetwork method (hyper_adapter, polyhistor, polyhistor_lite)")
    return index


def task_parameter_names(model: nn.Module, task: int) -> list[str]:
    """Names of the task-embedding parameters of `task` in every hypernetwork method."""
    from .core import split

    backbone, _ = split(model)
    return [f"peft_{k}_shared.tasks.{task}" for k, m in state_of(backbone).methods if isinstance(m, HYPER_METHODS)]
