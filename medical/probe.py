"""`python -m medical.probe`: the frozen-backbone regimes of the DINOv2 radiology study.

Extracts features once (cached on disk), then evaluates the kNN classifier for every k and
trains the grid of linear heads (last 1 / 4 blocks' CLS, with or without average-pooled patch
tokens, x learning rates) in one pass, choosing the best head on validation.

    python -m medical.probe --config domains/medical/probe.yaml --data.root /data/pneumoniamnist.npz
    python -m medical.probe            # offline demo: synthetic images, small random DINOv2-architecture ViT
    python -m medical.probe ... --resume   # continue a run stopped by SIGTERM / Ctrl-C (same flags)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

from medical.probes import KS, LRS, cached_features, describe, knn_auroc, knn_grid, train_linear_grid
from shared import backbones
from shared.cli import arg_value, friendly, is_demo, parse_tool_args, prepare_demo_data, write_json_atomic
from shared.data import FeatureCache
from shared.distributed import is_main, launched
from shared.lifecycle import OutputRun
from shared.resume import LoopCheckpoint

RECIPES = Path(__file__).resolve().parent.parent / "domains" / "medical"
DEMO = RECIPES / "probe_demo.yaml"


def parser() -> ArgumentParser:
    p = ArgumentParser(description="kNN and linear-probe grid on frozen backbone features", exit_on_error=False,
                       usage="python -m medical.probe --config RECIPE.yaml [--KEY VALUE ...]\n"
                             "       python -m medical.probe            (no arguments: the offline demo)\n\n"
                             "  recipes: domains/medical/probe.yaml (DINOv2 on MedMNIST), probe_demo.yaml (the demo)\n"
                             "  writes OUTPUT_DIR/{knn,linear}/metrics.json and OUTPUT_DIR/linear/adapter (the chosen head)")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--seed_everything", type=int, default=0)
    p.add_argument("--output_dir", default="runs/medical/probe")
    p.add_argument("--backbone", default="dinov2")
    p.add_argument("--backbone_kwargs", type=dict[str, Any], default={})
    p.add_argument("--blocks", type=int, default=4, help="last n blocks for the multi-block CLS feature")
    p.add_argument("--ks", type=list[int], default=list(KS))
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--lrs", type=list[float], default=list(LRS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--cache_dir", default="~/.cache/peft-suite/features")
    p.add_argument("--accelerator", default="auto", help="where features are extracted: auto (GPU when available), cpu, gpu / cuda, mps")
    p.add_argument("--resume", action=ActionYesNo, default=False,
                   help="continue the stopped run of this --output_dir from the last.ckpt its staging folder kept "
                        "(after its last finished epoch of the linear grid; same recipe and flags); an error when "
                        "there is none")
    p.add_subclass_arguments(L.LightningDataModule, "data")
    return p


def select_device(accelerator: str = "auto") -> torch.device:
    """The device feature extraction runs on: `auto` takes CUDA, then Apple MPS, when available."""
    a = str(accelerator).lower()
    if a == "cpu":
        return torch.device("cpu")
    if a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"--accelerator {accelerator}: no CUDA device is available (use auto or cpu)")
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if a == "mps" or (a == "auto" and mps is not None and mps.is_available()):
        if mps is None or not mps.is_available():
            raise ValueError(f"--accelerator {accelerator}: no MPS device is available (use auto or cpu)")
        return torch.device("mps")
    if a != "auto":
        raise ValueError(f"--accelerator must be auto, cpu, gpu, cuda or mps; got {accelerator!r}")
    return torch.device("cpu")


def save_probe_bundle(model, head: torch.nn.Module, feature: str, blocks: int, path: Path, *, backbone: str,
                      backbone_kwargs: dict, labels, preprocessing: dict, multilabel: bool, metrics: dict) -> Path:
    """The chosen linear probe as an adapter bundle `medical.predict` runs: the frozen backbone (no
    methods) + a LinearHead holding the probe's weights; `probe` records which feature it reads."""
    from shared import peft
    from shared.heads import LinearHead

    dim = backbones.anatomy(model).embed_dim
    pool = {"cls_1": "cls", "cls_1+patch_mean": "cls+patch_mean"}.get(feature)
    # cls_1 / cls_1+patch_mean are standard heads (the Classifier's own forward reproduces them);
    # the multi-block CLS variants read the last blocks, which medical.predict computes from `probe`.
    lin = LinearHead(dim if pool else head.in_features, head.out_features, pool=pool or "cls")
    lin.fc.load_state_dict(head.state_dict())
    peft.attach(model, [], backbone_id=backbone)
    clf = peft.Classifier(model, lin, labels=labels)
    return peft.save(clf, path, labels=labels, metrics=metrics, preprocessing=preprocessing, backbone_id=backbone,
                     backbone_kwargs=backbone_kwargs,
                     extra={"task": "classification", "multilabel": multilabel,
                            "probe": {"feature": feature, "blocks": blocks}})


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Under `torchrun --nproc_per_node N` every process extracts its share of the features and
    process 0 alone trains the probes, scores them and writes (the others return {})."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    cfg = parse_tool_args(p, argv, DEMO)
    # the output folder's lock (process 0) and a staging folder: a failed or stopped run leaves the
    # previous results as they were; a stopped one keeps last.ckpt (after its last finished epoch of the
    # linear grid) for --resume, which reads the features from the cache
    with launched(), OutputRun(cfg.output_dir, resume=bool(cfg.resume)) as claim:
        return _run(p, cfg, claim)


RUN_KEYS = ("config", "output_dir", "resume")  # not part of the recipe: where it writes, how it was started


def recipe_of(cfg) -> dict[str, Any]:
    return {k: v for k, v in cfg.as_dict().items() if k not in RUN_KEYS}


def _run(p: ArgumentParser, cfg, claim: OutputRun) -> dict[str, Any]:
    L.seed_everything(cfg.seed_everything, verbose=is_main())
    init = p.instantiate_classes(cfg)
    data = init.data
    data.setup("fit")
    model = backbones.create(cfg.backbone, **cfg.backbone_kwargs).eval()
    device = select_device(cfg.accelerator)
    model.to(device)
    if is_main():
        print(f"extracting features on {device}")
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader(), "test": data.test_dataloader()}
    cache = FeatureCache(Path(cfg.cache_dir).expanduser())
    # the whole data config (class, root, flag, seed, few_shot, split fractions, label policy)
    dataset_id = json.dumps(cfg.data.as_dict(), sort_keys=True, default=str)
    feats = cached_features(model, loaders, cache, getattr(data, "preprocessing", {}), dataset_id, cfg.blocks)
    if feats is None:  # another process than 0 under torchrun: its share of the features was gathered
        return {}
    model.cpu()
    multilabel = bool(getattr(data, "multilabel", False))
    rows = {}
    if not multilabel:
        knn = knn_grid(feats["train"], feats["test"], "cls_1", cfg.ks, cfg.temperature)
        knn_val = knn_grid(feats["train"], feats["val"], "cls_1", cfg.ks, cfg.temperature)
        best_k = max(knn_val, key=knn_val.get)
        rows["knn"] = {"method": "knn", "k": best_k, "val": knn_val[best_k], "test/acc": knn[best_k],
                       "test/auroc": knn_auroc(feats["train"], feats["test"], best_k, "cls_1", cfg.temperature),
                       "all_k": {str(k): v for k, v in knn.items()}, "trainable_params": 0}
        print("kNN (cosine, T=%.2f) test accuracy by k: %s; chosen on val: k=%d -> %.4f"
              % (cfg.temperature, {k: round(v, 4) for k, v in knn.items()}, best_k, knn[best_k]))
    # last.ckpt after every epoch of the grid (where features are extracted and cached may change on a resume)
    ckpt = LoopCheckpoint(claim, "medical.probe", {k: v for k, v in recipe_of(cfg).items()
                                                   if k not in ("accelerator", "cache_dir")})
    saved = ckpt.load()
    if saved is not None:
        print(f"resumed the linear grid after epoch {saved['epochs_done']}/{cfg.epochs} from {ckpt.path.name}")
    best, results, grid = train_linear_grid(feats, data.num_classes, multilabel, cfg.epochs, cfg.batch_size,
                                            cfg.lrs, cfg.blocks, cfg.seed_everything, resume=saved,
                                            on_epoch=ckpt.save)
    metric = "test/auroc" if multilabel else "test/acc"
    head = grid.heads[grid.names.index((best.feature, best.lr))]
    rows["linear"] = {"method": "linear_probe_grid", "feature": best.feature, "lr": best.lr, "val": best.val,
                      metric: best.test, "trainable_params": sum(p.numel() for p in head.parameters())}
    if not multilabel and best.test_auroc is not None:  # MedMNIST's headline metric beside accuracy
        rows["linear"]["test/auroc"] = best.test_auroc
    print(describe(results))
    auroc = f", test/auroc {best.test_auroc:.4f}" if "test/auroc" in rows["linear"] and metric != "test/auroc" else ""
    print(f"best linear probe on val: {best.feature} lr {best.lr:g} -> {metric} {best.test:.4f}{auroc}")
    out = Path(cfg.output_dir)
    total = sum(p.numel() for p in model.parameters())
    recipe = recipe_of(cfg)
    labels = getattr(data, "labels", None)
    stage = claim.stage  # everything is written here, then replaces out in one step
    save_probe_bundle(model, head, best.feature, cfg.blocks, stage / "linear" / "adapter",
                               backbone=cfg.backbone, backbone_kwargs=dict(cfg.backbone_kwargs), labels=labels,
                               preprocessing=getattr(data, "preprocessing", {}) or {}, multilabel=multilabel,
                               metrics={k: v for k, v in rows["linear"].items() if k.startswith("test/")} | {"val": best.val})
    for name, row in rows.items():
        row.update(run=f"{out.name}_{name}", backbone=cfg.backbone, dataset=getattr(data, "name", type(data).__name__),
                   fold=None, few_shot=getattr(data, "few_shot", None), protocol=getattr(data, "protocol", None),
                   total_params=total, config=recipe)
        write_json_atomic(stage / name / "metrics.json", row)
    claim.publish()
    bundle = out / "linear" / "adapter"
    print(f"metrics written to {out / 'knn' / 'metrics.json'} and {out / 'linear' / 'metrics.json'}" if "knn" in rows
          else f"metrics written to {out / 'linear' / 'metrics.json'}")
    print(f"chosen linear probe saved as a bundle: {bundle} (python -m medical.predict --adapter {bundle} IMAGE)")
    return rows


DEMO_NOTE = "synthetic radiology-like images (MONAI shapes, image-folder layout)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if is_demo(argv) and not {"-h", "--help", "--print_config"} & set(argv):
        from medical.synthetic import write_image_folder

        root = arg_value(argv, "--data.root", "--data.init_args.root") or \
            yaml.safe_load(DEMO.read_text())["data"]["init_args"]["root"]
        print("backbone: a small DINOv2-architecture ViT with RANDOM weights (demo; no pretrained knowledge)")
        prepare_demo_data(root, write_image_folder, DEMO_NOTE)
    return run(argv)


if __name__ == "__main__":
    sys.exit(friendly(main))
