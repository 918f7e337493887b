"""`--resume` of every Lightning domain CLI (`audio.train`, `medical.train`, `medical.segment`, `text.train`) on
its own recipe: a run stopped by SIGTERM after epoch 1 of 3 resumes into the same output folder and ends with
the test metrics of an uninterrupted run. The mechanism is shared (`shared.cli`, tested on the core demo in
tests/shared/test_run_lifecycle.py); this checks that no domain keeps state the checkpoint misses (SpecAugment
and the data order, medical segmentation's per-volume scores, the text tagger's document-level validation)."""
from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

import shared.cli as cli
from shared.cli import STAGE_ENV, friendly

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "3"]
TINY_VIT = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 4, num_heads: 4, reg_tokens: 4}"


@pytest.fixture(autouse=True)
def _no_inherited_stage(monkeypatch):
    monkeypatch.delenv(STAGE_ENV, raising=False)


def _audio(tmp):
    from audio import train
    from audio.synthetic import write_esc50_like

    data = write_esc50_like(tmp / "esc50", num_classes=3, clips_per_fold=2, seconds=1.0)
    return train.main, ["--data.init_args.root", str(data), "--data.init_args.cache_dir", str(tmp / "cache")]


def _medical(tmp):
    from medical import train
    from medical.synthetic import write_image_folder

    data = write_image_folder(tmp / "images", per_class={"train": 8, "val": 4, "test": 4}, size=32)
    return train.main, ["--data.root", str(data), "--model.backbone_kwargs", TINY_VIT, "--data.img_size", "32"]


def _segment(tmp):
    from medical import segment
    from medical.synthetic import write_lung_masks

    data = write_lung_masks(tmp / "lungs", n=12, size=32)
    return segment.main, ["--config", str(ROOT / "domains" / "medical" / "segmentation" / "lung_unet_lora.yaml"),
                          "--data.root", str(data), "--data.num_workers", "0", "--data.batch_size", "4",
                          "--model.backbone", "tiny-vit", "--model.backbone_kwargs", TINY_VIT, "--data.img_size", "32"]


def _text(tmp):
    from text import train

    return train.main, ["--data.root", str(tmp / "data"), "--data.init_args.test", "0.5"]


DOMAINS = {"audio.train": _audio, "medical.train": _medical, "medical.segment": _segment, "text.train": _text}


@pytest.mark.slow  # three short runs of each CLI (~10-40 s each here)
@pytest.mark.parametrize("cli_name", list(DOMAINS))
def test_stopped_domain_run_resumes_to_the_uninterrupted_metrics(cli_name, tmp_path, monkeypatch, capsys):
    main, base = DOMAINS[cli_name](tmp_path)
    whole = main([*base, *FAST, "--output_dir", str(tmp_path / "whole")])

    cut = tmp_path / "cut"
    line = cli.EpochLine.on_train_epoch_end

    def stop_after_first(self, trainer, pl_module):  # the scheduler's SIGTERM after epoch 1 of 3
        line(self, trainer, pl_module)
        if trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(cli.EpochLine, "on_train_epoch_end", stop_after_first)
    capsys.readouterr()
    assert friendly(main, [*base, *FAST, "--output_dir", str(cut)]) == 143
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("stopped by")]
    assert len(err) == 1 and err[0].endswith(" --resume") and not cut.exists()
    monkeypatch.undo()
    monkeypatch.delenv(STAGE_ENV, raising=False)

    resumed = main([*base, *FAST, "--output_dir", str(cut), "--resume"])
    assert "resumed after epoch 1/3" in (cut / "train.log").read_text()
    metrics = {k: v for k, v in whole.items() if k.startswith("test/") and isinstance(v, (int, float))}
    assert metrics, whole
    for k, v in metrics.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(resumed[k]), k
        else:
            assert resumed[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (cli_name, k)
    # the same recipe recorded (--resume and the output folder are not part of it)
    assert json.loads((cut / "metrics.json").read_text())["config"] == \
        json.loads((tmp_path / "whole" / "metrics.json").read_text())["config"]
