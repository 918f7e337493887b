"""Semantic segmentation on DINOv2-style ViTs with PEFT methods (DINOv2 radiology study).

    tokens = multi_block_tokens(backbone, images, blocks=4)        # last 4 blocks, final norm each
    logits = LinearDecoder(dim, num_classes)(tokens, images.shape[-2:])   # (B, C, H, W)
    module = SegmentationModule(backbone="dinov2", methods=[{"name": "lora", "r": 8}],
                                decoder={"kind": "unet"}, num_classes=3)
    module.save_bundle("runs/msd/adapter"); backbone, decoder, meta = load_segmenter("runs/msd/adapter")

Decoders read the patch tokens of the last few transformer blocks: `LinearDecoder` is DINOv2's
linear segmentation head (BatchNorm + 1x1 conv on the concatenated patch maps, bilinear
upsampling); `UNetDecoder` builds a pyramid from the single-scale ViT by upsampling 2x per stage
and injecting one block's features at each stage, deepest first.

Bundle layout: the backbone's PEFT tensors go through `shared.peft.save` unchanged
(`adapter.safetensors` + `adapter.json`), so `shared.peft.load` of a segmentation bundle still
gives the adapted backbone. The decoder's tensors live beside them in `decoder.safetensors`; its
config, checksum and tensor shapes are recorded in `adapter.json` under "decoder". The whole folder
is staged in a temporary directory and swapped in at once, so a bundle is never half written.

Metrics (background excluded), logged as `val|test/...`:
* `dice`: the split-level Dice that picks the checkpoint: TP / FP / FN pooled per class over the
  whole split (torchmetrics `DiceScore(aggregation_level="global")`, as the anchor's torchmetrics
  Dice), then averaged over classes; false positives on slices without the structure count.
* `dice_slice_mean`: secondary, MONAI `DiceMetric` per slice, nan-mean over the slices where the
  structure is present (blind to false positives on empty slices).
* `hd95`: MONAI `compute_hausdorff_distance(percentile=95)` per slice, in PIXELS of the model input
  (img_size x img_size). A structure missed entirely (or predicted where there is none) scores
  the image diagonal, the largest possible distance, so a miss never improves HD95; a slice
  where both are empty is left out.
Volume-level scores (`score_volume`) are computed at the label's native resolution, with HD95 in
mm when the file has a voxel spacing (`medical.io.read_spacing`), else in voxels; `METRIC_UNITS`
names the unit of each logged metric.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.metrics import Cumulative, DiceMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.networks.utils import one_hot
from torch import nn
from torchmetrics.segmentation import DiceScore

from shared import backbones, peft
from shared.artifacts import (BundleError, bundle_tensors, read_checked_tensors, resolve, save_tensors, sha256_file,
                              trained_tensors)
from shared.distributed import full_tensor, is_main
from shared.fs import replace_dir
from shared.heads import Tokens
from shared.module import PeftModule, log_eval_mean

DECODER_FILE = "decoder.safetensors"


# ----------------------------------------------------------------------------------------------
# Multi-block tokens
# ----------------------------------------------------------------------------------------------
def multi_block_tokens(backbone: nn.Module, x: torch.Tensor, blocks: int = 4) -> list[Tokens]:
    """Tokens of the last `blocks` blocks of a timm VisionTransformer, shallowest first.

    Each block's output goes through the final norm (as DINOv2's probes do) and keeps the prefix
    tokens (CLS, registers) and the H*W patch tokens. Prompt tokens (our `Prompt` method) sit
    between the two in every block but the last, whose hook strips them; the patches are always
    the last H*W tokens, so taking those drops prompts wherever they are present.
    """
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"multi_block_tokens needs a timm VisionTransformer, got {type(backbone).__name__}")
    depth = len(backbone.blocks)
    if not 1 <= blocks <= depth:
        raise ValueError(f"blocks must be in 1..{depth} (the backbone's depth), got {blocks}")
    outs = backbone.forward_intermediates(x, indices=blocks, norm=True, output_fmt="NLC", stop_early=True,
                                          intermediates_only=True, return_prefix_tokens=True)
    ph, pw = backbone.patch_embed.patch_size
    grid = (x.shape[-2] // ph, x.shape[-1] // pw)
    hw = grid[0] * grid[1]
    result = []
    for out in outs:
        rest, prefix = out if isinstance(out, tuple) else (out, None)  # (B, P + HW, D), (B, prefix, D)
        patches = rest[:, rest.shape[1] - hw:]  # (B, HW, D): prompts, if any, come before the patches
        if prefix is None:
            result.append(Tokens(patches, 0, grid))
        else:
            result.append(Tokens(torch.cat([prefix, patches], dim=1), prefix.shape[1], grid))
    return result


# ----------------------------------------------------------------------------------------------
# Decoders: (list of Tokens, output size) -> logits (B, C, H, W)
# ----------------------------------------------------------------------------------------------
def _maps(tokens: Sequence[Tokens], blocks: int) -> list[torch.Tensor]:
    if len(tokens) < blocks:
        raise ValueError(f"the decoder reads the last {blocks} blocks but got tokens of {len(tokens)}")
    return [t.patch_map() for t in tokens[len(tokens) - blocks:]]  # each (B, D, h, w), shallowest first


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class LinearDecoder(nn.Module):
    """DINOv2 linear segmentation head: concat last blocks' patch maps -> BatchNorm -> 1x1 conv -> upsample."""

    kind = "linear"

    def __init__(self, dim: int, num_classes: int, blocks: int = 1):
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        self.dim, self.num_classes, self.blocks = dim, num_classes, blocks
        self.norm = nn.BatchNorm2d(blocks * dim)
        self.classifier = nn.Conv2d(blocks * dim, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # ~0 logits at start: no class favoured
        nn.init.zeros_(self.classifier.bias)

    def forward(self, tokens: Sequence[Tokens], size) -> torch.Tensor:
        x = torch.cat(_maps(tokens, self.blocks), dim=1)  # (B, blocks*D, h, w)
        return _resize(self.classifier(self.norm(x)), size)  # (B, C, H, W)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes, "blocks": self.blocks}


class _ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNetDecoder(nn.Module):
    """A UNet-style decoder for a single-scale ViT.

    Stage i upsamples the running map 2x (never beyond the output size), concatenates block
    i's patch map (deepest block first, 1x1-projected to channels[i] and resized to the stage's
    resolution) and applies two 3x3 conv-BN-ReLU layers. Stages past the last block only
    upsample and refine. A 1x1 conv gives the logits, bilinearly resized to the input size.
    """

    kind = "unet"

    def __init__(self, dim: int, num_classes: int, blocks: int = 4, channels: Sequence[int] = (256, 128, 64, 32)):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not 1 <= blocks <= len(channels):
            raise ValueError(f"blocks must be in 1..len(channels)={len(channels)}, got {blocks}")
        self.dim, self.num_classes, self.blocks, self.channels = dim, num_classes, blocks, channels
        self.proj = nn.ModuleList(nn.Conv2d(dim, channels[i], 1) for i in range(blocks))
        self.stages = nn.ModuleList(
            _ConvBlock((channels[i - 1] if i else 0) + (channels[i] if i < blocks else 0), channels[i])
            for i in range(len(channels)))
        self.classifier = nn.Conv2d(channels[-1], num_classes, 1)

    def forward(self, tokens: Sequence[Tokens], size) -> torch.Tensor:
        maps = _maps(tokens, self.blocks)[::-1]  # deepest first, each (B, D, h, w)
        H, W = size
        h, w = maps[0].shape[-2:]
        x = None
        for i, stage in enumerate(self.stages):
            h, w = min(2 * h, H), min(2 * w, W)
            parts = [] if x is None else [_resize(x, (h, w))]
            if i < self.blocks:
                parts.append(_resize(self.proj[i](maps[i]), (h, w)))  # project at patch resolution: cheaper
            x = stage(torch.cat(parts, dim=1))  # (B, channels[i], h, w)
        return _resize(self.classifier(x), size)  # (B, C, H, W)

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes, "blocks": self.blocks,
                "channels": list(self.channels)}


DECODERS: dict[str, type[nn.Module]] = {"linear": LinearDecoder, "unet": UNetDecoder}


def build_decoder(config: dict) -> nn.Module:
    """Rebuild a decoder from its `config()` (weights are loaded separately)."""
    kwargs = dict(config)
    kind = kwargs.pop("kind", None)
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder kind {kind!r}; known: {sorted(DECODERS)}")
    return DECODERS[kind](**kwargs)


class Segmenter(nn.Module):
    """A ViT backbone (with its PEFT methods) and a decoder over its last blocks' patch tokens."""

    def __init__(self, backbone: nn.Module, decoder: nn.Module):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder

    def tokens(self, x: torch.Tensor) -> list[Tokens]:
        return multi_block_tokens(self.backbone, x, self.decoder.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for p in self.backbone.parameters()):
            toks = self.tokens(x)
        else:
            with torch.no_grad():  # frozen backbone: keep no activations for backward
                toks = self.tokens(x)
        return self.decoder(toks, x.shape[-2:])  # (B, C, H, W)

    def summary(self) -> dict[str, Any]:
        """`shared.peft.summary` of the backbone with the decoder counted as "decoder"."""
        s = peft.summary(self.backbone)
        n = sum(p.numel() for p in self.decoder.parameters())
        s["by_method"]["decoder"] = n
        s["total"] += n
        s["trainable"] += sum(p.numel() for p in self.decoder.parameters() if p.requires_grad)
        s["trainable_percent"] = 100.0 * s["trainable"] / max(s["total"], 1)
        return s


def segmenter_tensor_names(model: Segmenter) -> list[str]:
    """Names (relative to a Segmenter) of the tensors a bundle or checkpoint keeps."""
    return ([f"backbone.{n}" for n in trained_tensors(model.backbone)]
            + [f"decoder.{n}" for n in model.decoder.state_dict()])


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
@contextmanager
def _quiet_metrics():
    # MONAI warns on every empty class (expected on most slices) and about one of its own
    # deprecated arguments; both would flood training logs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* is all 0, this may result in nan/inf distance")
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy", category=FutureWarning)
        yield


def _new_metrics() -> dict[str, Any]:
    return {"dice_slice_mean": DiceMetric(include_background=False, reduction="none"),
            "hd95": Cumulative()}  # per-sample HD95 with misses penalised (`hd95_with_misses`)


def hd95_with_misses(pred: torch.Tensor, target: torch.Tensor, spacing=None) -> torch.Tensor:
    """HD95 per (sample, foreground class) of one-hot (B, C, *spatial) tensors, where a class
    present in only one of prediction and ground truth scores the diagonal of the image / volume
    (in the units of `spacing`, default pixels) and a class absent from both is nan."""
    with _quiet_metrics():
        hd = compute_hausdorff_distance(pred, target, include_background=False, percentile=95,
                                        spacing=spacing).float().cpu()  # (B, C-1)
    shape = torch.tensor(pred.shape[2:], dtype=torch.float32)
    if spacing is not None:
        shape = shape * torch.as_tensor(spacing, dtype=torch.float32).reshape(-1)[: len(shape)]
    diagonal = float(torch.linalg.vector_norm(shape))
    p = pred[:, 1:].flatten(2).any(-1).cpu()
    t = target[:, 1:].flatten(2).any(-1).cpu()
    hd = torch.where(p != t, torch.full_like(hd, diagonal), hd)
    return torch.where(~p & ~t, torch.full_like(hd, float("nan")), hd)


# The unit of each logged metric (written to metrics.json by shared.cli).
METRIC_UNITS = {"hd95": "px (model input)", "volume_hd95": "mm if the label file has a spacing, else voxels"}


def _per_class(values: torch.Tensor) -> torch.Tensor:
    """(N, C) with nan / inf where undefined -> (C,) nan-ignoring means over N (nan if none)."""
    v = values.float().clone()
    v[~torch.isfinite(v)] = float("nan")
    return torch.nanmean(v, dim=0)


def _nanmean(v: torch.Tensor) -> float:
    return float(torch.nanmean(v)) if v.numel() else float("nan")


def volume_metrics(pred, label, num_classes: int, spacing: Sequence[float] | float | None = None) -> dict[str, Any]:
    """Dice and HD95 of a whole label volume (D, H, W) (or a 2-D map) against its ground truth.

    Classes 1..C-1 are scored (background excluded); "dice" / "hd95" are means over the classes
    present in the prediction or the ground truth, "*_per_class" the per-class values (nan for a
    class absent from both). A class missed entirely (or predicted where there is none) has Dice
    0 and HD95 = the volume's diagonal. `spacing` (per axis of `pred`) gives HD95 in physical
    units (e.g. mm per voxel); without it HD95 is in voxels.
    """
    p = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred).long()
    y = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label).long()
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and label {tuple(y.shape)} must have the same shape")
    if spacing is not None and not isinstance(spacing, (int, float)):
        spacing = [float(s) for s in spacing]  # MONAI wants one element type
    p = one_hot(p[None, None].cpu(), num_classes)  # (1, C, D, H, W)
    y = one_hot(y[None, None].cpu(), num_classes)
    with _quiet_metrics():
        dice = DiceMetric(include_background=False, reduction="none")(p, y)[0]  # (C-1,)
    present = p[0, 1:].flatten(1).any(-1) | y[0, 1:].flatten(1).any(-1)
    dice = torch.where(present & torch.isnan(dice), torch.zeros_like(dice), dice)  # predicted, not there: 0
    hd = hd95_with_misses(p, y, spacing)[0]
    return {"dice": _nanmean(dice), "hd95": _nanmean(hd),
            "dice_per_class": dice.tolist(), "hd95_per_class": hd.tolist()}


@torch.no_grad()
def predict_volume(backbone: nn.Module, decoder: nn.Module, volume_slices, batch: int = 16,
                   size: Sequence[int] | None = None) -> torch.Tensor:
    """Segment a volume slice by slice: (D, 3, S, S) preprocessed slices -> (D, S, S) labels (CPU,
    int64), or (D, *size) when `size` is given: logits are resized bilinearly to `size` (e.g. the
    label's native in-plane size) before the argmax."""
    model = Segmenter(backbone, decoder)
    modes = [(m, m.training) for m in (backbone, decoder)]
    model.eval()
    ref = next(backbone.parameters())
    x = torch.as_tensor(np.asarray(volume_slices) if not isinstance(volume_slices, torch.Tensor) else volume_slices)
    try:
        out = []
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch].to(ref.device, ref.dtype))  # (b, C, S, S)
            if size is not None and tuple(size) != tuple(logits.shape[-2:]):
                logits = _resize(logits, size)
            out.append(logits.argmax(1).cpu())
    finally:
        for m, was in modes:
            m.train(was)
    return torch.cat(out) if out else torch.zeros(0, *(size or x.shape[-2:]), dtype=torch.long)


def score_volume(backbone: nn.Module, decoder: nn.Module, data, image_path, label_path) -> dict[str, Any]:
    """Dice / HD95 of one volume of a data module with `load_volume` (Decathlon), scored at the
    label's NATIVE resolution: slices are predicted at the model's size, their logits resized to
    the label's in-plane size, and HD95 uses the file's voxel spacing (mm) when it has one.
    Returns `volume_metrics`' dict plus "hd95_unit" ("mm" or "voxel")."""
    from medical.io import read_mask, read_spacing

    x, _ = data.load_volume(image_path, None)  # (D, 3, S, S), D = the file's last axis
    label = torch.from_numpy(np.asarray(read_mask(label_path))).long()  # (H, W, D) native
    pred = predict_volume(backbone, decoder, x, size=label.shape[:2])  # (D, H, W)
    spacing = read_spacing(label_path)
    scores = volume_metrics(pred.permute(1, 2, 0), label, data.num_classes, spacing=spacing)
    scores["hd95_unit"] = "mm" if spacing is not None else "voxel"
    return scores


# ----------------------------------------------------------------------------------------------
# Bundles
# ----------------------------------------------------------------------------------------------
def save_segmenter(backbone: nn.Module, decoder: nn.Module, path: str | os.PathLike, labels: list[str] | None = None,
                   metrics: dict[str, Any] | None = None, preprocessing: dict[str, Any] | None = None,
                   backbone_id: str | None = None, backbone_kwargs: dict[str, Any] | None = None) -> Path:
    """Write a segmentation bundle (see the module docstring) atomically. Returns the folder."""
    if labels is not None and len(labels) != decoder.num_classes:
        raise BundleError(f"{len(labels)} labels given but the decoder predicts {decoder.num_classes} classes")
    path = Path(path)
    # sharded (FSDP2): every process gathers the decoder, then the backbone's tensors; process 0 writes
    tensors = {k: full_tensor(v.detach()).cpu().contiguous() for k, v in decoder.state_dict().items()}
    if not is_main():
        bundle_tensors(backbone)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_tensors(tensors, stage / DECODER_FILE, metadata={"format": "peft-suite-decoder"})
        info = {"config": decoder.config(), "file": DECODER_FILE, "sha256": sha256_file(stage / DECODER_FILE),
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                            for k, v in tensors.items()}}
        bundle = peft.save(backbone, stage / "bundle", labels=labels, metrics=metrics, preprocessing=preprocessing,
                           backbone_id=backbone_id, backbone_kwargs=backbone_kwargs,
                           extra={"task": "segmentation", "decoder": info})
        os.replace(stage / DECODER_FILE, bundle / DECODER_FILE)
        replace_dir(bundle, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


def _load_decoder(path: Path, meta: dict[str, Any]) -> nn.Module:
    info = meta.get("decoder")
    where = path / "adapter.json"
    if not isinstance(info, dict) or "config" not in info:
        raise BundleError(f"{where}: not a segmentation bundle (no 'decoder' entry); use shared.peft.load")
    try:
        decoder = build_decoder(info["config"])
    except (ValueError, TypeError) as e:
        raise BundleError(f"{where}: decoder: {e}") from None
    tpath = path / info.get("file", DECODER_FILE)
    tensors = read_checked_tensors(tpath, info.get("sha256"))
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise BundleError(f"{tpath}: does not fit a {info['config']}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    decoder.load_state_dict(tensors)
    return decoder


def load_segmenter(path: str | os.PathLike, backbone: nn.Module | None = None,
                   check_fingerprint: bool = True) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(backbone, decoder, meta) from a segmentation bundle, both in eval mode.

    Without `backbone`, the bundle's registered backbone id (+ kwargs) is rebuilt as
    `shared.peft.from_bundle` does; with one, the bundle is loaded into it (`shared.peft.load`).
    The decoder is validated (checksum, names, shapes) before the backbone is built or touched.
    """
    path = resolve(path)  # a folder, hf://…, https://…#sha256=… or a catalogue name (shared.hub)
    meta = peft.read_meta(path)
    decoder = _load_decoder(path, meta)
    if backbone is None:
        backbone = peft.from_bundle(path, check_fingerprint=check_fingerprint)
    else:
        backbone = peft.load(backbone, path, check_fingerprint=check_fingerprint)
    dim = backbones.anatomy(backbone).embed_dim
    if dim != decoder.dim:
        raise BundleError(f"{path}: decoder expects width {decoder.dim} but the backbone's is {dim}")
    return backbone.eval(), decoder.eval(), meta


# ----------------------------------------------------------------------------------------------
# Lightning
# ----------------------------------------------------------------------------------------------
class SegmentationModule(PeftModule):
    """A ViT backbone + PEFT methods + segmentation decoder, AdamW with a per-step cosine schedule.

    Args:
        backbone / backbone_kwargs: a name registered in `shared.backbones` (a timm ViT:
            `tiny-vit`, `dinov2`) and its constructor arguments.
        methods: PEFT method configs; `[]` keeps the backbone frozen (decoder only).
        decoder: `{"kind": "linear" | "unet", ...}` without `dim` / `num_classes`.
        num_classes / labels: classes including background (label 0).
        lr, weight_decay, betas, eps: AdamW. warmup_fraction: share of steps in linear warm-up.
        decay_exclude: no weight decay on biases, norms (the decoder's BatchNorm), prompts, prefixes.
        preprocessing: stored in the bundle (e.g. mean/std, window, img_size).

    Batches are `(images (B, 3, H, W), masks (B, 1, H, W) or (B, H, W))` or MONAI-style dicts
    with "image" and "label". Logs `{stage}/loss`, and `val|test/dice` (split-level, chooses the
    checkpoint), `dice_slice_mean`, `hd95` (px; see the module docstring; per-class `dice_<label>`
    too when there are several foreground classes).
    """

    monitor = "val/dice"
    metric_units = {f"{s}/{k}": u for s in ("val", "test") for k, u in METRIC_UNITS.items()}

    def __init__(self, backbone: str = "tiny-vit", backbone_kwargs: dict[str, Any] | None = None,
                 methods: list[dict[str, Any]] | None = None, decoder: dict[str, Any] | None = None,
                 num_classes: int = 2, labels: list[str] | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 warmup_fraction: float = 0.0, preprocessing: dict[str, Any] | None = None,
                 decay_exclude: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"{len(labels)} labels for num_classes={num_classes}")
        net = backbones.create(backbone, **(backbone_kwargs or {}))
        peft.attach(net, methods or [], backbone_id=backbone)
        anat = backbones.anatomy(net)
        cfg = {"kind": "linear", **(decoder or {})}
        cfg.update(dim=anat.embed_dim, num_classes=num_classes)
        dec = build_decoder(cfg)
        if dec.blocks > len(anat.blocks()):
            raise ValueError(f"decoder reads {dec.blocks} blocks but the backbone has {len(anat.blocks())}")
        self.model = Segmenter(net, dec)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.metrics = {s: _new_metrics() for s in ("val", "test")}
        # TP / FP / FN pooled over the split per class; states gathered across processes.
        self.split_dice = nn.ModuleDict({s: DiceScore(num_classes, include_background=False, average="none",
                                                      aggregation_level="global", input_format="one-hot")
                                         for s in ("val", "test")})

    def forward(self, x):
        return self.model(x)

    @staticmethod
    def _unpack(batch):
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        if y.ndim == x.ndim - 1:
            y = y.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
        return x, y.long()

    def _shared_step(self, batch, stage: str):
        x, y = self._unpack(batch)
        logits = self(x)  # (B, C, H, W)
        if stage != "train":  # the distributed sampler's padding counts in no loss or metric
            n = self.real(len(x))
            if n == 0:
                return None
            x, y, logits = x[:n], y[:n], logits[:n]
        loss = self.loss_fn(logits, y)
        if stage == "train" and (extra := peft.regularization(self.model)) is not None:
            loss = loss + extra  # e.g. AdaLoRA's orthogonality penalty
        if stage == "train":
            self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        else:
            log_eval_mean(self, f"{stage}/loss", loss, len(x), prog_bar=stage != "test")
        if stage != "train":
            c = self.hparams.num_classes
            pred, target = one_hot(logits.argmax(1, keepdim=True), c), one_hot(y, c)
            with _quiet_metrics():
                self.metrics[stage]["dice_slice_mean"](y_pred=pred, y=target)
            self.metrics[stage]["hd95"].extend(hd95_with_misses(pred, target))
            self.split_dice[stage].update(pred.long(), target.long())
        return loss

    def _log_metrics(self, stage):
        values = {}
        for name, metric in self.metrics[stage].items():
            buf = metric.get_buffer()  # (N, C-1), gathered across processes by MONAI
            metric.reset()
            if buf is None or not len(buf):
                continue
            values[f"{stage}/{name}"] = _nanmean(_per_class(buf))
        if self.split_dice[stage].update_count:
            # (C-1,), nan for a class with no TP, FP or FN in the whole split
            per_class = self.split_dice[stage].compute().reshape(-1).float().cpu()
            values[f"{stage}/dice"] = _nanmean(per_class)
            if len(per_class) > 1:
                names = self.hparams.labels or [str(i) for i in range(self.hparams.num_classes)]
                values.update({f"{stage}/dice_{n}": float(v) for n, v in zip(names[1:], per_class)})
        self.split_dice[stage].reset()
        if values:
            # Identical on every rank (MONAI gathered the buffers); sync_dist averages equal numbers.
            self.log_dict(values, prog_bar=True, sync_dist=True)

    def trained_tensor_names(self) -> list[str]:
        return segmenter_tensor_names(self.model)

    def param_summary(self) -> dict[str, Any]:
        return self.model.summary()

    def save_bundle(self, path, metrics: dict[str, Any] | None = None):
        hp = self.hparams
        return save_segmenter(self.model.backbone, self.model.decoder, path, labels=hp.labels, metrics=metrics,
                              preprocessing=hp.preprocessing, backbone_id=hp.backbone,
                              backbone_kwargs=hp.backbone_kwargs)
