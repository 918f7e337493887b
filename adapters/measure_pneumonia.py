"""Accuracy and AUROC for the README's real-weights table (PneumoniaMNIST balanced subset).

`medical.probe` and `medical.train` report accuracy for a binary task; this adds the AUROC of
the same models, from the same runs:

    # kNN (k chosen on val) + the linear-probe grid: pass the exact medical.probe arguments (its
    # feature cache is reused, the grid is retrained with the same seed and picks the same head)
    python adapters/measure_pneumonia.py probe -- --config domains/medical/probe.yaml --data.root <npz> ...
    # the same from the feature files medical.probe cached (train, val, test), probe.yaml's settings
    python adapters/measure_pneumonia.py features <train>.safetensors <val>.safetensors <test>.safetensors
    # a trained bundle (e.g. medical.train's output_dir/adapter) on the test split
    python adapters/measure_pneumonia.py bundle <bundle> --npz <npz>
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc


def _scores(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {"acc": (probs.argmax(-1) == y).float().mean().item(), "auroc": binary_auroc(probs[:, 1], y).item()}


def evaluate(feats: dict, ks=(5, 20, 50, 100, 200), temperature: float = 0.07, blocks: int = 4, epochs: int = 10,
             batch_size: int = 128, lrs=(1e-3, 5e-3, 1e-2, 5e-2), seed: int = 0) -> dict:
    """kNN (cls_1, k chosen on val) and the linear-probe grid (head chosen on val), as medical.probe."""
    from medical.probes import train_linear_grid, variants
    from shared.heads import KNNClassifier

    knn = KNNClassifier(temperature=temperature, num_classes=2).fit(feats["train"]["cls_1"], feats["train"]["labels"])
    val = {k: _scores(p, feats["val"]["labels"])["acc"] for k, p in
           knn.predict_proba(feats["val"]["cls_1"], k=list(ks)).items()}
    k = max(val, key=val.get)  # the same choice as medical.probe (first k with the best val accuracy)
    out = {"knn": {"k": k, **_scores(knn.predict_proba(feats["test"]["cls_1"], k=k), feats["test"]["labels"])}}
    best, _, grid = train_linear_grid(feats, 2, False, epochs, batch_size, list(lrs), blocks, seed)
    head = grid.heads[grid.names.index((best.feature, best.lr))]
    with torch.no_grad():
        logits = head(variants(feats["test"], blocks)[best.feature])
    out["linear"] = {"feature": best.feature, "lr": best.lr, **_scores(logits.softmax(-1), feats["test"]["labels"])}
    return out


def probe(argv: list[str]) -> dict:
    import lightning as L

    from medical import probe as cli
    from medical.probes import cached_features
    from shared import backbones
    from shared.data import FeatureCache

    p = cli.parser()
    cfg = p.parse_args(argv)
    L.seed_everything(cfg.seed_everything)
    data = p.instantiate_classes(cfg).data
    data.setup("fit")
    model = backbones.create(cfg.backbone, **cfg.backbone_kwargs).eval()
    loaders = {"train": data.train_dataloader(), "val": data.val_dataloader(), "test": data.test_dataloader()}
    dataset_id = json.dumps(cfg.data.as_dict(), sort_keys=True, default=str)
    feats = cached_features(model, loaders, FeatureCache(Path(cfg.cache_dir).expanduser()),
                            getattr(data, "preprocessing", {}), dataset_id, cfg.blocks)
    return evaluate(feats, cfg.ks, cfg.temperature, cfg.blocks, cfg.epochs, cfg.batch_size, cfg.lrs, cfg.seed_everything)


def bundle(path: str, npz: str, batch_size: int = 64) -> dict:
    from medical.data import MedMNISTDataModule
    from shared import peft

    model = peft.from_bundle(path).eval()
    size = (model.bundle_meta.get("preprocessing") or {}).get("size", 224)
    data = MedMNISTDataModule(npz, img_size=size, batch_size=batch_size, num_workers=0)
    data.setup("test")
    probs, ys = [], []
    with torch.inference_mode():
        for x, y in data.test_dataloader():
            probs.append(model(x).softmax(-1))
            ys.append(y)
    return _scores(torch.cat(probs), torch.cat(ys))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:
        rest = argv[1:]
        print(json.dumps(probe(rest[1:] if rest[:1] == ["--"] else rest), indent=2))
        return 0
    if argv[:1] == ["features"] and len(argv) == 4:
        from safetensors.torch import load_file

        print(json.dumps(evaluate({s: load_file(f) for s, f in zip(("train", "val", "test"), argv[1:])}), indent=2))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["bundle"])
    ap.add_argument("bundle")
    ap.add_argument("--npz", required=True)
    a = ap.parse_args(argv)
    print(json.dumps(bundle(a.bundle, a.npz), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
