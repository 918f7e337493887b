"""`python -m audio.train`: PETL for Audio Spectrogram Transformers.

With no arguments: an offline demo on a small synthetic dataset in the ESC-50 layout, written
on first use, with a small AST of RANDOM weights (no download). With a recipe:

    python -m audio.train --config domains/audio/esc50_adapter.yaml --data.init_args.root /data/ESC-50
"""
from __future__ import annotations

import sys
from pathlib import Path

from shared.cli import domain_main, friendly

RECIPES = Path(__file__).resolve().parent.parent / "domains" / "audio"
DEMO = RECIPES / "demo.yaml"
DEMO_DATA = {"num_classes": 5, "clips_per_fold": 6, "seconds": 2.0}  # 150 clips, 2 s each


def check_frames(model, data) -> None:
    """The backbone must fit the features the frontend produces (frames and mel bins; for Whisper
    also the frontend itself: `audio.whisper.check_features`)."""
    cfg = getattr(model.model.backbone, "config", None)
    fbank = getattr(data, "fbank", None)
    if cfg is not None and fbank is not None and (getattr(cfg, "model_type", None) == "whisper"
                                                  or fbank.to_dict()["frontend"] != "fbank_ast"):
        from audio.whisper import check_features

        check_features(cfg, fbank)
    elif cfg is not None and fbank is not None:
        if cfg.max_length != fbank.target_frames:
            raise ValueError(f"model.backbone_kwargs.max_length={cfg.max_length} but the data frontend produces "
                             f"{fbank.target_frames} frames (data.target_frames): set both to the same value")
        if cfg.num_mel_bins != fbank.num_mel_bins:
            raise ValueError(f"the backbone expects {cfg.num_mel_bins} mel bins but the frontend produces "
                             f"{fbank.num_mel_bins} (model.backbone_kwargs.num_mel_bins)")
    bb = model.hparams.backbone
    if bb.startswith("tiny-"):
        print(f"backbone: {bb}, a small model with RANDOM weights (demo / tests; no pretrained knowledge)")
    else:
        print(f"backbone: {bb} {model.hparams.backbone_kwargs or ''}")


def write_demo_data(root: str) -> None:
    from audio.synthetic import write_esc50_like

    write_esc50_like(root, **DEMO_DATA)


def test_metrics(model, data) -> dict:
    """Metrics a data module defines itself (BirdSet's cmAP / T1-Acc / AUROC), added to metrics.json."""
    return data.test_metrics(model) if hasattr(data, "test_metrics") else {}


def main(argv: list[str] | None = None) -> dict:
    return domain_main(argv, DEMO, write_demo_data, "synthetic sounds in the ESC-50 layout", describe=check_frames,
                       evaluate=test_metrics)


if __name__ == "__main__":
    sys.exit(friendly(main))
