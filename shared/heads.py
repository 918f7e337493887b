"""Classification heads on top of a frozen or adapted backbone, plus a kNN probe and the ASL loss.

Every head consumes a `Tokens` (the backbone's final-norm token sequence with enough metadata
to find CLS and patch tokens) and returns logits (B, C). Heads describe themselves with
`config()` so that `build_head(config)` can rebuild them when an adapter bundle is loaded.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

POOLS = ("cls", "mean", "patch_mean", "cls+patch_mean", "last")


class Tokens(NamedTuple):
    """A backbone's output token sequence after its final norm.

    x: (B, N, D). The first `num_prefix` tokens are non-patch tokens (CLS, distillation,
    registers); CLS is index 0 whenever num_prefix > 0. `grid` is the patch grid (H, W) with
    N - num_prefix == H * W (row-major: token num_prefix + h*W + w is patch (h, w)), or None
    for 1-D sequences (text, audio frames without a grid). `mask`: (B, N), 1 / True for real
    tokens and 0 / False for padding (a text model's attention_mask), or None when every token
    is real; "mean", "patch_mean" and "last" pooling then read only real tokens.
    """

    x: torch.Tensor
    num_prefix: int = 0
    grid: tuple[int, int] | None = None
    mask: torch.Tensor | None = None

    @property
    def patches(self) -> torch.Tensor:
        return self.x[:, self.num_prefix :]  # (B, N - num_prefix, D)

    def patch_map(self) -> torch.Tensor:
        """Patch tokens as a feature map (B, D, H, W)."""
        if self.grid is None:
            raise ValueError("Tokens.patch_map needs a patch grid, but grid is None (1-D sequence)")
        h, w = self.grid
        b, n, d = self.x.shape
        if n - self.num_prefix != h * w:
            raise ValueError(
                f"Tokens.patch_map: {n} tokens - {self.num_prefix} prefix = {n - self.num_prefix} "
                f"patch tokens, but grid {h}x{w} needs {h * w}"
            )
        # (B, HW, D) -> (B, D, HW) -> (B, D, H, W); row-major so index h*W + w lands at [h, w]
        return self.patches.transpose(1, 2).reshape(b, d, h, w)

    def pool(self, how: str) -> torch.Tensor:
        """Pool to one vector per sample: (B, D), or (B, 2D) for "cls+patch_mean"."""
        if how not in POOLS:
            raise ValueError(f"unknown pooling {how!r}; expected one of {POOLS}")
        if how in ("cls", "cls+patch_mean") and self.num_prefix == 0:
            raise ValueError(f"pool={how!r} needs a CLS token, but num_prefix == 0")
        if how in ("patch_mean", "cls+patch_mean") and self.x.shape[1] <= self.num_prefix:
            raise ValueError(f"pool={how!r} needs patch tokens, but all tokens are prefix tokens")
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.x.shape[:2]):
            raise ValueError(f"Tokens.mask has shape {tuple(self.mask.shape)}, expected {tuple(self.x.shape[:2])}")
        if how == "cls":
            return self.x[:, 0]  # (B, D)
        if how == "mean":
            return _masked_mean(self.x, self.mask)  # all tokens, prefix included (PETL-AST)
        if how == "patch_mean":
            m = None if self.mask is None else self.mask[:, self.num_prefix :]
            return _masked_mean(self.patches, m)  # (B, D)
        if how == "cls+patch_mean":
            m = None if self.mask is None else self.mask[:, self.num_prefix :]
            return torch.cat([self.x[:, 0], _masked_mean(self.patches, m)], dim=-1)  # (B, 2D), DINOv2 probe
        # "last": the token that has seen the whole sequence in a causal decoder; with a mask, each
        # row's last real token (right padding would otherwise hand the head a pad token)
        if self.mask is None:
            return self.x[:, -1]
        n = self.x.shape[1]
        pos = torch.arange(n, device=self.x.device).expand(self.x.shape[0], n)
        last = torch.where(self.mask.bool(), pos, -1).amax(1).clamp(min=0)  # (B,); all-pad rows read token 0
        return self.x[torch.arange(self.x.shape[0], device=self.x.device), last]  # (B, D)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over dim 1 of (B, N, D), counting only tokens where mask (B, N) is set."""
    if mask is None:
        return x.mean(1)
    w = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)


def pooled_dim(dim: int, how: str) -> int:
    """Width of `Tokens.pool(how)` for a backbone of width `dim`."""
    if how not in POOLS:
        raise ValueError(f"unknown pooling {how!r}; expected one of {POOLS}")
    return 2 * dim if how == "cls+patch_mean" else dim


def _init_classifier(linear: nn.Linear) -> None:
    # Small weights and zero bias: the initial logits are ~0, so no class is favoured at step 0.
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)


class LinearHead(nn.Module):
    """pool -> optional LayerNorm -> dropout -> Linear."""

    kind = "linear"

    def __init__(self, dim: int, num_classes: int, pool: str = "cls", norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.dim, self.num_classes, self.pool, self.dropout_p = dim, num_classes, pool, dropout
        width = pooled_dim(dim, pool)
        # A fresh LayerNorm helps when pooled features are not normalised (e.g. "mean" of raw tokens).
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)
        _init_classifier(self.fc)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        z = self.norm(tokens.pool(self.pool))  # (B, D) or (B, 2D)
        return self.fc(self.dropout(z))  # (B, C)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes, "pool": self.pool,
                "norm": isinstance(self.norm, nn.LayerNorm), "dropout": self.dropout_p}


class AttentiveHead(nn.Module):
    """Learnable queries cross-attend over all tokens -> mean over queries -> LayerNorm -> Linear.

    If `num_heads` does not divide `dim`, gcd(dim, num_heads) heads are used instead (the largest
    head count <= num_heads that both divide); config() reports the head count actually used.
    """

    kind = "attentive"

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, num_queries: int = 1):
        super().__init__()
        if dim % num_heads:
            num_heads = math.gcd(dim, num_heads)
        self.dim, self.num_classes, self.num_heads, self.num_queries = dim, num_classes, num_heads, num_queries
        self.queries = nn.Parameter(torch.empty(1, num_queries, dim))  # (1, Q, D)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        _init_classifier(self.fc)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        x = tokens.x  # (B, N, D)
        q = self.queries.expand(x.shape[0], -1, -1)  # (B, Q, D)
        pad = None if tokens.mask is None else ~tokens.mask.bool()  # (B, N): True where padding
        z, _ = self.attn(q, x, x, key_padding_mask=pad, need_weights=False)  # (B, Q, D)
        return self.fc(self.norm(z.mean(1)))  # (B, C)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes,
                "num_heads": self.num_heads, "num_queries": self.num_queries}


PATCH_LAYOUTS = ("grid", "birdmae_reshape")


class PrototypicalHead(nn.Module):
    """Bird-MAE prototypical probe.

    Patch tokens form a (B, D, H, W) map ("focal": minus the CLS token, so prototypes match what
    is specific to a location rather than the clip-level summary), upsampled bilinearly. Each
    class owns `prototypes_per_class` prototype vectors (rows c*P .. c*P + P - 1 of
    `prototypes`); a prototype's score is the ReLU'd cosine similarity at its best-matching
    location, divided by `cosine_scale`. A class logit is a non-negative weighted sum of its own
    prototypes' scores plus a bias, so evidence for a class can only come from that class's
    prototypes.

    `cosine_scale`: Bird-MAE divides every cosine by 1.01 (its PPNet `cos_activation`), so a
    perfect match scores 0.990; 1.0 gives the plain cosine (what this head did before).
    `patch_layout`: how the patch sequence becomes a map before the x2 bilinear upsampling.
    "grid" (default) is the true patch grid (`Tokens.grid`, Bird-MAE: 32 time x 8 mel), so
    interpolation mixes neighbours in time and frequency. "birdmae_reshape" is Bird-MAE's
    `reshape(B, D, 8, 32)` of the time-major sequence: each row then holds 4 consecutive time
    steps x 8 mel patches, so the upsampling blends patches that are not neighbours (mel patch 7
    of one time step with mel patch 0 of the next). The layout only matters through the
    upsampling (the max pool is global); it is offered to reproduce the reference, not because
    it is right.
    """

    kind = "prototypical"

    def __init__(self, dim: int, num_classes: int, prototypes_per_class: int = 20, focal: bool = True,
                 upsample: int = 2, cosine_scale: float = 1.01, patch_layout: str = "grid"):
        super().__init__()
        if patch_layout not in PATCH_LAYOUTS:
            raise ValueError(f"patch_layout must be one of {PATCH_LAYOUTS}, got {patch_layout!r}")
        if not cosine_scale > 0:
            raise ValueError(f"cosine_scale must be > 0, got {cosine_scale!r}")
        self.dim, self.num_classes, self.prototypes_per_class = dim, num_classes, prototypes_per_class
        self.focal, self.upsample = focal, upsample
        self.cosine_scale, self.patch_layout = float(cosine_scale), patch_layout
        self.prototypes = nn.Parameter(torch.rand(num_classes * prototypes_per_class, dim))  # (C*P, D), U(0,1)
        # Init weight 1 / bias -2: a class fires only once ~2 of its prototypes match well.
        self.weight = nn.Parameter(torch.ones(num_classes, prototypes_per_class))  # (C, P)
        self.bias = nn.Parameter(torch.full((num_classes,), -2.0))  # (C,)

    def feature_map(self, tokens: Tokens) -> torch.Tensor:
        """The (B, D, H, W) map the prototypes are matched on, before upsampling: (H, W) is the patch
        grid, or (W, H) for "birdmae_reshape" (then not a time x frequency grid)."""
        if self.focal and tokens.num_prefix > 0:
            patches = tokens.patches - tokens.x[:, :1]  # (B, HW, D) minus CLS (B, 1, D)
            tokens = Tokens(patches, 0, tokens.grid)
        fmap = tokens.patch_map()  # (B, D, H, W), checks the grid
        if self.patch_layout == "birdmae_reshape":
            b, d, h, w = fmap.shape
            # the reference's reshape of the (B, D, HW) sequence into W rows of H: not a transpose
            fmap = tokens.patches.transpose(1, 2).reshape(b, d, w, h)
        return fmap

    def similarity_maps(self, tokens: Tokens, eps: float = 1e-8) -> torch.Tensor:
        """ReLU'd, scaled cosine similarity of every prototype at every (upsampled) location:
        (B, C, P, H', W'). Its spatial max is `similarities`; explanations read where it peaks
        (in time x frequency only with patch_layout "grid"). A sequence without a frequency axis
        (grid (T, 1), e.g. Whisper's time steps) gives maps (B, C, P, upsample x T, 1): prototypes
        over time."""
        fmap = self.feature_map(tokens)
        if self.upsample != 1:  # a 1-wide map (a sequence: grid (T, 1)) is upsampled along its length only
            scale = (self.upsample, 1) if fmap.shape[-1] == 1 else self.upsample
            fmap = F.interpolate(fmap, scale_factor=scale, mode="bilinear", align_corners=False)
        f = F.normalize(fmap, dim=1, eps=eps)  # (B, D, H', W')
        p = F.normalize(self.prototypes, dim=1, eps=eps)  # (C*P, D)
        sim = (torch.einsum("bdhw,kd->bkhw", f, p) / self.cosine_scale).relu()  # (B, C*P, H', W')
        return sim.view(sim.shape[0], self.num_classes, self.prototypes_per_class, *sim.shape[-2:])

    def similarities(self, tokens: Tokens, eps: float = 1e-8) -> torch.Tensor:
        """Max-pooled ReLU cosine similarity of each prototype: (B, C, P)."""
        return self.similarity_maps(tokens, eps).flatten(3).amax(-1)  # global max pool over space

    def forward(self, tokens: Tokens) -> torch.Tensor:
        sim = self.similarities(tokens)  # (B, C, P)
        # clamp keeps the class-wise layer non-negative without a projection step in the optimiser
        return (sim * self.weight.clamp(min=0)).sum(-1) + self.bias  # (B, C)

    def orthogonality_loss(self) -> torch.Tensor:
        """Bird-MAE's orthogonality loss: ||P_c P_c^T - I||_F taken over all classes at once (the
        Frobenius norm of the (C, P, P) stack), divided by its number of entries C * P * P.

        P_c are the class's prototypes as unit-norm rows: the similarity is a cosine, so only
        directions matter, and unnormalised U(0,1) prototypes would make the Gram's diagonal dominate.
        Train them with their own learning rate through `lr_groups: {"head\\.prototypes": 0.04}`.
        """
        p = F.normalize(self.prototypes, dim=1).view(self.num_classes, self.prototypes_per_class, self.dim)  # (C, P, D)
        gram = p @ p.transpose(1, 2)  # (C, P, P)
        eye = torch.eye(self.prototypes_per_class, device=p.device, dtype=p.dtype)
        return torch.linalg.vector_norm(gram - eye) / gram.numel()

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes,
                "prototypes_per_class": self.prototypes_per_class, "focal": self.focal, "upsample": self.upsample,
                "cosine_scale": self.cosine_scale, "patch_layout": self.patch_layout}


HEADS: dict[str, type[nn.Module]] = {"linear": LinearHead, "attentive": AttentiveHead, "prototypical": PrototypicalHead}


# What a config saved before a field existed meant: a bundle keeps computing what it was trained with
# (prototypical heads before `cosine_scale` used the plain cosine).
LEGACY_DEFAULTS: dict[str, dict] = {"prototypical": {"cosine_scale": 1.0, "patch_layout": "grid"}}


def build_head(config: dict) -> nn.Module:
    """Rebuild a head from its `config()` (weights are loaded separately with load_state_dict)."""
    kwargs = dict(config)
    kind = kwargs.pop("kind", None)
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {sorted(HEADS)}")
    return HEADS[kind](**{**LEGACY_DEFAULTS.get(kind, {}), **kwargs})


def _as_tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a


class KNNClassifier:
    """Weighted cosine kNN (DINO protocol) on frozen features.

    Neighbour weights are exp(sim / T); per-class sums are normalised to probabilities.
    Probabilities are returned as float32 CPU tensors. A k larger than the number of training
    samples is clipped to that number (every training sample votes) instead of raising, so one
    k grid can be used across few-shot sizes.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, num_classes: int | None = None):
        self.k, self.temperature, self.num_classes = k, temperature, num_classes
        self.features: torch.Tensor | None = None  # (N, D), unit rows
        self.labels: torch.Tensor | None = None  # (N,)

    def fit(self, features, labels) -> "KNNClassifier":
        f = _as_tensor(features).float()
        y = _as_tensor(labels).long().flatten().clone()  # never alias the caller's array
        if f.ndim != 2 or f.shape[0] != y.shape[0]:
            raise ValueError(f"fit expects features (N, D) and labels (N,), got {tuple(f.shape)} and {tuple(y.shape)}")
        if y.numel() == 0 or y.min() < 0:
            raise ValueError("fit needs at least one sample and non-negative integer labels")
        num_classes = self.num_classes if self.num_classes is not None else int(y.max()) + 1
        if int(y.max()) >= num_classes:
            raise ValueError(f"label {int(y.max())} out of range for num_classes={num_classes}")
        self.num_classes = num_classes
        self.features, self.labels = F.normalize(f, dim=1), y
        return self

    def predict_proba(self, queries, k: int | Sequence[int] | None = None, chunk_size: int = 1024):
        """(Q, C) class probabilities; for a list of ks, a dict {k: (Q, C)} from one top-k search."""
        if self.features is None:
            raise ValueError("KNNClassifier.predict_proba called before fit")
        q = _as_tensor(queries).float().to(self.features.device)
        if q.ndim != 2 or q.shape[1] != self.features.shape[1]:
            raise ValueError(f"queries must be (Q, {self.features.shape[1]}), got {tuple(q.shape)}")
        single = k is None or isinstance(k, (int, np.integer))
        ks = [int(self.k if k is None else k)] if single else [int(kk) for kk in k]
        if not ks or min(ks) < 1:
            raise ValueError(f"k must be >= 1 (or a non-empty list of such), got {k!r}")
        n = self.features.shape[0]
        kmax = min(max(ks), n)
        q = F.normalize(q, dim=1)
        out: dict[int, list[torch.Tensor]] = {kk: [] for kk in ks}
        for start in range(0, q.shape[0], chunk_size):  # bounds the (chunk, N) similarity matrix
            sim = q[start : start + chunk_size] @ self.features.T  # (q, N)
            top_sim, top_idx = sim.topk(kmax, dim=1)  # (q, kmax), sorted descending
            # Subtracting the best similarity cancels in the normalisation but avoids exp overflow at small T.
            w = ((top_sim - top_sim[:, :1]) / self.temperature).exp()  # (q, kmax)
            onehot = F.one_hot(self.labels[top_idx], self.num_classes).to(w.dtype)  # (q, kmax, C)
            for kk in ks:
                kk_ = min(kk, n)
                votes = (w[:, :kk_, None] * onehot[:, :kk_]).sum(1)  # (q, C)
                out[kk].append((votes / votes.sum(1, keepdim=True)).cpu())
        probs = {kk: torch.cat(v) if v else torch.zeros(0, self.num_classes) for kk, v in out.items()}
        return probs[ks[0]] if single else probs

    def predict(self, queries, k: int | Sequence[int] | None = None, chunk_size: int = 1024):
        """(Q,) predicted class; a dict {k: (Q,)} for a list of ks."""
        p = self.predict_proba(queries, k=k, chunk_size=chunk_size)
        return {kk: v.argmax(1) for kk, v in p.items()} if isinstance(p, dict) else p.argmax(1)


ASL_REDUCTIONS = ("mean", "batchmean", "sum")


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-8, reduction: str = "mean") -> torch.Tensor:
    """Asymmetric multi-label loss (Ridnik et al. 2021), as Bird-MAE trains its probes.

    loss = -[y (1-p)^gamma_pos log p + (1-y) p_m^gamma_neg log(1-p_m)], p = sigmoid(logits),
    p_m = max(p - clip, 0): easy negatives (p < clip) are discarded entirely.

    reduction: "mean" (default, Bird-MAE's `AsymmetricLossMultiLabel(reduction="mean")`): the mean
    over all B x C elements; "batchmean": summed over the classes, averaged over the batch, exactly
    C times "mean" (what this function returned before; it changes the loss's balance against the
    orthogonality loss and what gradient clipping does); "sum": over everything (the reference's
    other option, which ties the effective learning rate to the batch size).
    log p uses logsigmoid, exact for large |logits| (the reference clamps p at eps, the same for
    logits above log(eps) = -18.4); eps only guards log(1 - p_m).
    """
    if reduction not in ASL_REDUCTIONS:
        raise ValueError(f"asymmetric_loss: reduction must be one of {ASL_REDUCTIONS}, got {reduction!r}")
    targets = targets.to(logits.dtype)  # (B, C)
    p = torch.sigmoid(logits)
    pos = targets * (1 - p).pow(gamma_pos) * F.logsigmoid(logits)
    if clip > 0:
        p_m = (p - clip).clamp(min=0)
        log_not_p_m = torch.log((1 - p_m).clamp(min=eps))
    else:
        p_m, log_not_p_m = p, F.logsigmoid(-logits)  # log(1 - sigmoid(x)) = logsigmoid(-x)
    neg = (1 - targets) * p_m.pow(gamma_neg) * log_not_p_m
    loss = -(pos + neg)  # (B, C)
    if reduction == "mean":
        return loss.mean()
    if reduction == "batchmean":
        return loss.sum(-1).mean()
    return loss.sum()
