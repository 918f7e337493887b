"""`python -m audio.probe`: Bird-MAE's frozen-backbone probes (linear, attentive, prototypical)
trained together on cached backbone tokens, evaluated multi-label on soundscape windows.

The backbone runs once per window (tokens cached on disk, keyed by its fingerprint, the frontend
and the dataset); every epoch after that reads the cache, and all probe kinds train in the same
pass over it (augmentation is off: a cached token is the same in every epoch).

    python -m audio.probe                                             # offline demo (synthetic birds)
    python -m audio.probe --config domains/bioacoustic/hsn.yaml --data.root /data/birdset/HSN
    python -m audio.probe --config domains/bioacoustic/fsdd.yaml     # real audio: FSDD soundscapes
    python -m audio.probe --config domains/bioacoustic/fsdd_whisper.yaml   # the same on Whisper tiny.en tokens
    python -m audio.probe ... --resume                                # continue a run stopped by SIGTERM / Ctrl-C

Writes OUTPUT_DIR/<kind>/metrics.json (test/cmap, test/auroc, test/top1, and `definition`:
"reference" when the metrics follow BirdSet's code, see `audio.birds.metrics`; `definitions` and
`conventions` name each choice), OUTPUT_DIR/<kind>/adapter (a bundle `audio.explain` reads) and
OUTPUT_DIR/results.md.

Training conventions (Bird-MAE's unless noted; each is a switch): the asymmetric loss averaged over
all batch x class elements (`--loss_reduction`, "batchmean" = summed over classes), the prototype
cosine divided by 1.01 (`--cosine_scale`), short clips zero-padded as audio (`--data.init_args.pad`),
and the patch map laid out on the true time x mel grid (`--patch_layout grid`, ours: Bird-MAE's
reshape lays 4 time steps x 8 mel patches along each row, `birdmae_reshape`).

Backbones: Bird-MAE (`bird-mae`, `tiny-bird-mae`; tokens on a time x mel patch grid, a CLS token)
or a Whisper encoder (`whisper`, `tiny-whisper`, with `data.init_args.frontend: whisper` and
`target_frames` = the backbone's `max_frames`): its tokens are time steps only (20 ms each, no
CLS, no frequency axis), so the prototypical head's prototypes live over time (maps of T x 1,
upsampled along time) and options that need a frequency axis or a CLS token are refused in one line.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
from torch import nn

from audio.birds import metrics as M
from shared import backbones
from shared.cli import friendly, parse_tool_args, write_json_atomic
from shared.data import FeatureCache, dataset_digest, extract_features_once
from shared.distributed import is_main, launched
from shared.lifecycle import OutputRun
from shared.resume import LoopCheckpoint
from shared.heads import (ASL_REDUCTIONS, PATCH_LAYOUTS, AttentiveHead, LinearHead, PrototypicalHead, Tokens,
                          asymmetric_loss)
from shared.module import cosine_with_warmup

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "bioacoustic"
DEMO = RECIPES / "demo.yaml"
KINDS = ("linear", "attentive", "prototypical")


# ----------------------------------------------------------------------------------------------- metrics
def cmap(scores: torch.Tensor, target: torch.Tensor, definition: str = "birdset") -> float:
    """BirdSet's cmAP (`audio.birds.metrics.cmap`): mean AP over the classes with a positive window."""
    return M.cmap(scores, target, definition)


def top1(scores: torch.Tensor, target: torch.Tensor, definition: str = "birdset") -> float:
    """BirdSet's T1-Acc (`audio.birds.metrics.top1`): the best class is one of the window's labels,
    over the windows with a label."""
    return M.top1(scores, target, definition)


def scores(logits: torch.Tensor, target: torch.Tensor, definitions: dict[str, str] | None = None) -> dict[str, float]:
    return M.bird_scores(logits, target, definitions)


def metric_definitions(options: dict[str, str] | None) -> dict[str, str]:
    """BirdSet's definitions (`audio.birds.metrics.DEFAULTS`) with `--metrics` overrides, checked."""
    known = {"cmap": M.CMAP, "top1": M.TOP1, "auroc": M.AUROC}
    out = dict(M.DEFAULTS)
    for k, v in (options or {}).items():
        if k not in known:
            raise ValueError(f"--metrics: unknown metric {k!r}; known: {', '.join(known)}")
        if v not in known[k]:
            raise ValueError(f"--metrics.{k}: unknown definition {v!r}; known: {', '.join(known[k])}")
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------- probes
def make_heads(kinds, dim: int, num_classes: int, prototypes_per_class: int = 20, focal: bool = True,
               upsample: int = 2, cosine_scale: float = 1.01, patch_layout: str = "grid") -> nn.ModuleDict:
    heads = {}
    for kind in kinds:
        if kind == "linear":  # LayerNorm + Linear on the mean of the patch tokens
            heads[kind] = LinearHead(dim, num_classes, pool="patch_mean", norm=True)
        elif kind == "attentive":
            heads[kind] = AttentiveHead(dim, num_classes, num_heads=8)
        elif kind == "prototypical":
            heads[kind] = PrototypicalHead(dim, num_classes, prototypes_per_class, focal=focal, upsample=upsample,
                                           cosine_scale=cosine_scale, patch_layout=patch_layout)
        else:
            raise ValueError(f"unknown probe kind {kind!r}; known: {', '.join(KINDS)}")
    return nn.ModuleDict(heads)


def head_loss(head: nn.Module, logits: torch.Tensor, y: torch.Tensor, ortho_weight: float,
              reduction: str = "mean") -> torch.Tensor:
    loss = asymmetric_loss(logits, y, reduction=reduction)
    if isinstance(head, PrototypicalHead) and ortho_weight:
        loss = loss + ortho_weight * head.orthogonality_loss()
    return loss


def optimizer(heads: nn.ModuleDict, lr: float, prototype_lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW (Bird-MAE): prototypes at their own lr, every other head tensor at `lr`."""
    protos = [p for n, p in heads.named_parameters() if n.endswith("prototypes")]
    others = [p for n, p in heads.named_parameters() if not n.endswith("prototypes")]
    groups = [{"params": others, "lr": lr}] + ([{"params": protos, "lr": prototype_lr}] if protos else [])
    return torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)


def train_epoch(heads, opt, sched, batches, ortho_weight: float, clip: float, reduction: str = "mean") -> float:
    """One pass: every head steps on every batch; returns the summed loss (mean over batches)."""
    heads.train()
    total, n = 0.0, 0
    for tokens, y in batches:
        loss_sum = 0.0
        opt.zero_grad(set_to_none=True)
        for head in heads.values():
            loss = head_loss(head, head(tokens), y, ortho_weight, reduction)
            loss.backward()  # heads share nothing: their gradients are independent
            loss_sum += float(loss.detach())
        for head in heads.values():  # clip each probe on its own, as if trained alone
            torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
        opt.step()
        sched.step()
        total, n = total + loss_sum, n + 1
    return total / max(n, 1)


def cached_batches(tokens: torch.Tensor, y: torch.Tensor, num_prefix: int, grid, batch_size: int,
                   generator: torch.Generator):
    order = torch.randperm(len(y), generator=generator)
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        yield Tokens(tokens[idx], num_prefix, grid), y[idx]


def recompute_batches(model, loader, device, num_prefix: int, grid):
    """What a run without the cache does every epoch: decode, fbank and the backbone forward."""
    anat = backbones.anatomy(model)
    for x, y in loader:
        with torch.inference_mode():
            t = anat.forward_tokens(x.to(device)).x.cpu()
        yield Tokens(t.clone(), num_prefix, grid), y


@torch.no_grad()
def predict(heads, tokens: torch.Tensor, num_prefix: int, grid, batch_size: int = 256) -> dict[str, torch.Tensor]:
    heads.eval()
    out = {k: [] for k in heads}
    for i in range(0, len(tokens), batch_size):
        t = Tokens(tokens[i:i + batch_size], num_prefix, grid)
        for k, h in heads.items():
            out[k].append(h(t))
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- CLI
def parser() -> ArgumentParser:
    p = ArgumentParser(description="Bird-MAE probes (linear, attentive, prototypical) on cached backbone tokens",
                       exit_on_error=False,
                       usage="python -m audio.probe --config RECIPE.yaml [--KEY VALUE ...]\n"
                             "       python -m audio.probe            (no arguments: the offline demo, synthetic birds)\n\n"
                             "  recipes: domains/bioacoustic/{demo,fsdd,hsn,nbp,nes,per,pow,sne,ssw,uhh}.yaml\n"
                             "  writes OUTPUT_DIR/<kind>/{metrics.json,adapter/} and OUTPUT_DIR/results.md")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--seed_everything", type=int, default=0)
    p.add_argument("--output_dir", default="runs/bioacoustic/probe")
    p.add_argument("--backbone", default="bird-mae")
    p.add_argument("--backbone_kwargs", type=dict[str, Any], default={})
    p.add_argument("--probes", type=list[str], default=list(KINDS))
    p.add_argument("--prototypes_per_class", type=int, default=20)
    p.add_argument("--focal_similarity", type=Optional[bool], default=None,
                   help="prototypes match patch tokens minus CLS (Bird-MAE); default: on when the backbone has a CLS "
                        "token, off otherwise (Whisper)")
    p.add_argument("--upsample", type=int, default=2)
    p.add_argument("--cosine_scale", type=float, default=1.01,
                   help="prototype cosine divided by this (Bird-MAE: 1.01; 1.0: the plain cosine)")
    p.add_argument("--patch_layout", default="grid",
                   help="patch map before upsampling: grid (true time x mel; a time-only backbone: time x 1) or "
                        "birdmae_reshape (Bird-MAE's; needs a time x mel grid)")
    p.add_argument("--loss_reduction", default="mean",
                   help="asymmetric loss: mean over batch x classes (Bird-MAE), batchmean (summed over classes), sum")
    p.add_argument("--metrics", type=dict[str, str], default={},
                   help="metric definitions other than BirdSet's, e.g. {top1: first_label, auroc: defined}")
    p.add_argument("--ortho_weight", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--prototype_lr", type=float, default=0.04)
    p.add_argument("--weight_decay", type=float, default=3e-4)
    p.add_argument("--betas", type=list[float], default=[0.9, 0.95])
    p.add_argument("--warmup_fraction", type=float, default=0.067)
    p.add_argument("--grad_clip", type=float, default=2.0)
    p.add_argument("--time_recompute", type=bool, default=True,
                   help="also time one epoch that recomputes the backbone instead of reading the cache")
    p.add_argument("--cache_dir", default="~/.cache/peft-suite/features")
    p.add_argument("--accelerator", default="auto", help="where features are extracted: auto, cpu, gpu / cuda")
    p.add_argument("--num_threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 suits tiny models on a busy CPU")
    p.add_argument("--resume", action=ActionYesNo, default=False,
                   help="continue the stopped run of this --output_dir from the last.ckpt its staging folder kept "
                        "(after its last finished epoch; same recipe and flags); an error when there is none")
    p.add_subclass_arguments(L.LightningDataModule, "data")
    return p


def _device(accelerator: str) -> torch.device:
    a = str(accelerator).lower()
    if a in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {accelerator}: no CUDA device is available (use auto or cpu)")
    if a not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"--accelerator must be auto, cpu, gpu or cuda; got {accelerator!r}")
    return torch.device("cuda" if a != "cpu" and torch.cuda.is_available() else "cpu")


def is_whisper(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "whisper"


def check_backbone(model: nn.Module, anat, frontend, cfg) -> bool:
    """The backbone, the data frontend and the probe options fit together; returns the focal setting.

    A Whisper encoder reads Whisper log-mel windows of exactly its `max_frames`; Bird-MAE reads the
    Bird-MAE fbank. A backbone whose tokens have no frequency axis (grid (T, 1)) cannot take
    Bird-MAE's reshape layout, and one without a CLS token cannot take focal similarity. One
    ValueError naming the setting otherwise."""
    from audio.birds.frontend import BirdWhisperConfig

    whisper, mel = is_whisper(model), isinstance(frontend, BirdWhisperConfig)
    if whisper and not mel:
        raise ValueError(f"--backbone {cfg.backbone} reads Whisper log-mel features: set data.init_args.frontend: "
                         f"whisper (with data.init_args.target_frames = backbone_kwargs.max_frames)")
    if mel and not whisper:
        raise ValueError(f"data.init_args.frontend: whisper makes Whisper log-mel features, but --backbone "
                         f"{cfg.backbone} is not a Whisper encoder (use frontend: birdmae)")
    if whisper:
        frames = 2 * int(model.config.max_source_positions)
        if frames != frontend.target_frames:
            raise ValueError(f"backbone_kwargs.max_frames is {frames} but data.init_args.target_frames is "
                             f"{frontend.target_frames}: set both to the same value (500 = one 5 s window)")
        if model.config.num_mel_bins != frontend.num_mel_bins:
            raise ValueError(f"--backbone {cfg.backbone} expects {model.config.num_mel_bins} mel bins but the "
                             f"frontend makes {frontend.num_mel_bins} (data.init_args.num_mel_bins / "
                             f"backbone_kwargs.num_mel_bins)")
    grid = anat.grid()
    time_only = grid is None or grid[1] == 1
    if "prototypical" in cfg.probes and time_only and cfg.patch_layout != "grid":
        raise ValueError(f"--patch_layout {cfg.patch_layout} cannot apply: the {cfg.backbone} tokens are time steps "
                         f"with no frequency axis (use --patch_layout grid)")
    if "prototypical" in cfg.probes and cfg.focal_similarity and anat.num_prefix_tokens == 0:
        raise ValueError(f"--focal_similarity true cannot apply: the {cfg.backbone} tokens have no CLS token to "
                         f"subtract (use --focal_similarity false, or leave it unset)")
    return anat.num_prefix_tokens > 0 if cfg.focal_similarity is None else bool(cfg.focal_similarity)


def results_table(rows: dict[str, dict]) -> str:
    lines = ["| probe | cmAP | AUROC | top-1 | trainable params | epoch on cache (s) | epoch recomputing (s) |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in rows.items():
        rec = r.get("epoch_s_recompute")
        lines.append(f"| {kind} | {100 * r['test/cmap']:.1f} | {100 * r['test/auroc']:.1f} | {100 * r['test/top1']:.1f} "
                     f"| {r['trainable_params']:,} | {r['epoch_s_cached']:.3f} | {'-' if rec is None else f'{rec:.2f}'} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    cfg = parse_tool_args(p, argv, DEMO)
    for k in cfg.probes:
        if k not in KINDS:
            raise ValueError(f"--probes: unknown probe kind {k!r}; known: {', '.join(KINDS)}")
    definitions = metric_definitions(cfg.metrics)
    if cfg.patch_layout not in PATCH_LAYOUTS:
        raise ValueError(f"--patch_layout must be one of {', '.join(PATCH_LAYOUTS)}, got {cfg.patch_layout!r}")
    if cfg.loss_reduction not in ASL_REDUCTIONS:
        raise ValueError(f"--loss_reduction must be one of {', '.join(ASL_REDUCTIONS)}, got {cfg.loss_reduction!r}")
    if not cfg.cosine_scale > 0:
        raise ValueError(f"--cosine_scale must be > 0, got {cfg.cosine_scale}")
    # torchrun --nproc_per_node N: every process extracts its share of the tokens. The output folder's
    # lock (process 0) and a staging folder: a failed or stopped run leaves the previous results as they were
    # A stopped run keeps its staging folder with last.ckpt (after its last finished epoch) for --resume
    with launched(), OutputRun(cfg.output_dir, resume=bool(cfg.resume)) as claim:
        return _run(p, cfg, definitions, claim)


RUN_KEYS = ("config", "output_dir", "resume")  # not part of the recipe: where it writes, how it was started


def recipe_of(cfg) -> dict[str, Any]:
    return {k: v for k, v in cfg.as_dict().items() if k not in RUN_KEYS}


def _run(p: ArgumentParser, cfg, definitions, claim: OutputRun) -> dict[str, Any]:
    """Process 0 alone trains, scores and writes; the others return {} once their tokens are gathered."""
    t_start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    L.seed_everything(cfg.seed_everything, verbose=False)
    data = (p.instantiate(cfg) if hasattr(p, "instantiate") else p.instantiate_classes(cfg)).data
    model = backbones.create(cfg.backbone, **cfg.backbone_kwargs).eval()
    anat = backbones.anatomy(model)
    focal = check_backbone(model, anat, data.cfg, cfg) if hasattr(data, "cfg") else cfg.focal_similarity is not False
    data.setup("fit")
    if is_main():
        print(data.describe() if hasattr(data, "describe") else type(data).__name__)
    if cfg.backbone.startswith("tiny") and is_main():
        arch = "a Whisper encoder" if is_whisper(model) else "the Bird-MAE architecture"
        print(f"backbone: {cfg.backbone}, {arch} with RANDOM weights (no pretrained knowledge)")
    elif is_whisper(model) and is_main():
        print(f"backbone: {cfg.backbone}, weights {model.config.name_or_path}, {2 * model.config.max_source_positions} "
              f"frames -> {model.config.max_source_positions} time tokens of 20 ms (no frequency axis)")
    device = _device(cfg.accelerator)
    model.to(device)
    cache = FeatureCache(Path(cfg.cache_dir).expanduser())
    from shared.peft import fingerprint

    fp = fingerprint(model)
    dataset_id = json.dumps(cfg.data.as_dict(), sort_keys=True, default=str)
    feats, t_extract = {}, time.perf_counter()
    for split in ("train", "test"):
        items = getattr(getattr(data, "splits", {}).get(split), "items", [])
        digest = dataset_digest(sorted({it.path for it in items}))  # files changed in place: a new key
        key = cache.key(fp, data.preprocessing, f"{dataset_id}:{split}:{digest}", extractor="birdmae_tokens")
        feats[split] = extract_features_once(lambda x: anat.forward_tokens(x).x, data.feature_loader(split), device,
                                             cache, key)
    if not is_main():
        return {}
    t_extract = time.perf_counter() - t_extract
    print(f"tokens: {'read from the cache' if not cache.misses else f'computed on {device} and cached'} "
          f"({t_extract:.1f} s) in {cache.root}")
    train_tokens, y_train = feats["train"]["features"].float(), feats["train"]["labels"].float()
    test_tokens, y_test = feats["test"]["features"].float(), feats["test"]["labels"].float()
    num_prefix, grid = anat.num_prefix_tokens, tuple(anat.grid())
    dim, c = train_tokens.shape[-1], y_train.shape[1]

    torch.manual_seed(cfg.seed_everything)
    heads = make_heads(cfg.probes, dim, c, cfg.prototypes_per_class, focal, cfg.upsample,
                       cfg.cosine_scale, cfg.patch_layout)
    opt = optimizer(heads, cfg.lr, cfg.prototype_lr, cfg.weight_decay, cfg.betas)
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_fraction * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, total, warmup))
    g = torch.Generator().manual_seed(cfg.seed_everything)
    epoch_times = []
    # last.ckpt after every epoch: heads, optimizer, schedule, the batch order's generator, the RNGs
    # (where and how fast it runs may change on a resume: threads, device, cache folder)
    ckpt = LoopCheckpoint(claim, "audio.probe", {k: v for k, v in recipe_of(cfg).items()
                                                 if k not in ("num_threads", "accelerator", "cache_dir", "time_recompute")})
    saved = ckpt.load()
    if saved is not None:
        heads.load_state_dict(saved["heads"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        g.set_state(saved["generator"])
        epoch_times = list(saved["epoch_times"])
        print(f"resumed after epoch {len(epoch_times)}/{cfg.epochs} from {ckpt.path.name}")
    for epoch in range(len(epoch_times), cfg.epochs):
        t0 = time.perf_counter()
        loss = train_epoch(heads, opt, sched, cached_batches(train_tokens, y_train, num_prefix, grid,
                                                             cfg.batch_size, g), cfg.ortho_weight, cfg.grad_clip,
                           cfg.loss_reduction)
        epoch_times.append(time.perf_counter() - t0)
        if epoch == 0 or (epoch + 1) % max(1, cfg.epochs // 5) == 0 or epoch + 1 == cfg.epochs:
            print(f"epoch {epoch + 1}/{cfg.epochs}: summed probe loss {loss:.4f} ({epoch_times[-1]:.3f} s on the cache)")
        ckpt.save({"heads": heads.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                   "generator": g.get_state(), "epoch_times": epoch_times})
    recompute_s = None
    if cfg.time_recompute:  # the same step on copies, fed by the backbone instead of the cache
        h2, t0 = copy.deepcopy(heads), time.perf_counter()
        o2 = optimizer(h2, cfg.lr, cfg.prototype_lr, cfg.weight_decay, cfg.betas)
        s2 = torch.optim.lr_scheduler.LambdaLR(o2, lambda s: 1.0)
        train_epoch(h2, o2, s2, recompute_batches(model, data.train_dataloader(), device, num_prefix, grid),
                    cfg.ortho_weight, cfg.grad_clip, cfg.loss_reduction)
        recompute_s = time.perf_counter() - t0
    logits = predict(heads, test_tokens, num_prefix, grid)

    from shared import peft

    model.cpu()
    peft.attach(model, [], backbone_id=cfg.backbone)
    out = Path(cfg.output_dir)
    stage = claim.stage  # everything is written here, then replaces out in one step
    recipe = recipe_of(cfg)
    rows = {}
    cached_s = sum(epoch_times) / len(epoch_times) if epoch_times else float("nan")
    for kind, head in heads.items():
        conventions = {"loss_reduction": cfg.loss_reduction,
                       "short_clips": getattr(getattr(data, "cfg", None), "pad", None)}
        if kind == "prototypical":
            conventions.update(cosine_scale=cfg.cosine_scale, patch_layout=cfg.patch_layout, focal=focal,
                               prototype_axes="time" if grid[1] == 1 else "time x frequency")
        row = {"method": f"{kind}_probe", **scores(logits[kind], y_test, definitions),
               "definition": M.definition_label(definitions), "definitions": definitions, "conventions": conventions,
               "trainable_params": sum(p.numel() for p in head.parameters()),
               "total_params": sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in head.parameters()),
               "epoch_s_cached": cached_s, "epoch_s_recompute": recompute_s, "extract_s": t_extract,
               "backbone": cfg.backbone, "dataset": getattr(data, "name", type(data).__name__), "fold": None,
               "few_shot": getattr(data, "few_shot", None), "run": f"{out.name}_{kind}", "config": recipe}
        clf = peft.Classifier(model, head.cpu().eval(), labels=data.labels)
        saved = {k: v for k, v in row.items() if k.startswith("test/") or k == "definition"}
        peft.save(clf, stage / kind / "adapter", labels=data.labels, metrics=saved,
                  preprocessing=data.preprocessing, backbone_id=cfg.backbone, backbone_kwargs=dict(cfg.backbone_kwargs),
                  extra={"task": "multilabel", "domain": "bioacoustic"})
        write_json_atomic(stage / kind / "metrics.json", row)
        rows[kind] = row
    table = results_table(rows)
    wall = time.perf_counter() - t_start
    from shared.fs import atomic_write

    label = M.definition_label(definitions)
    note = (f"metric definitions: {label}" + (" (BirdSet's metric code)" if label == "reference" else "")
            + f"; loss reduction {cfg.loss_reduction}, cosine / {cfg.cosine_scale:g}, patch layout {cfg.patch_layout}, "
              f"short clips padded: {data.cfg.pad if hasattr(data, 'cfg') else '?'}")
    weights = model.config.name_or_path if is_whisper(model) and not cfg.backbone.startswith("tiny") else None
    on = cfg.backbone + (f" ({weights}, {grid[0]} time tokens)" if weights else "")
    atomic_write(stage / "results.md", f"# {rows[next(iter(rows))]['dataset']}: probes on {on}\n\n{table}\n\n"
                                       f"{note}\n\nwall time {wall:.1f} s (feature extraction {t_extract:.1f} s)\n")
    claim.publish()
    print(table)
    print(note)
    print(f"wall time {wall:.1f} s; metrics in {out}/<kind>/metrics.json, table in {out / 'results.md'}; explain a clip: "
          f"python -m audio.explain --adapter {out / 'prototypical' / 'adapter'} CLIP.wav")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(argv)


if __name__ == "__main__":
    sys.exit(friendly(main))
