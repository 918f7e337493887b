"""medical.train with the depth-cache recipe (LoRA on the top 3 of 12 blocks), on a tiny 12-block ViT:
the training run reads its batches from the cache; with augmentation on it warns once and trains as usual."""
from __future__ import annotations

from pathlib import Path

import pytest

from medical import train
from medical.synthetic import write_image_folder

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "medical"
TINY12 = "{img_size: 32, patch_size: 8, embed_dim: 16, depth: 12, num_heads: 2}"
FAST = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
        "--model.backbone", "tiny-vit", "--model.backbone_kwargs", TINY12, "--data.img_size", "32",
        "--data.num_workers", "0", "--data.batch_size", "8", "--trainer.max_epochs", "1"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("med") / "images", per_class={"train": 6, "val": 3, "test": 3},
                              size=32)


@pytest.fixture(autouse=True)
def _no_stage_env(monkeypatch):
    monkeypatch.delenv("PEFT_SUITE_STAGE_DIR", raising=False)


def _run(images, tmp_path, name, *extra):
    return train.main(["--config", str(RECIPES / "data" / "image_folder.yaml"),
                       "--config", str(RECIPES / "depth_cache" / "lora_top3.yaml"), "--data.root", str(images),
                       "--output_dir", str(tmp_path / name), "--model.depth_cache_dir", str(tmp_path / "cache"),
                       *FAST, *extra])


def test_depth_cache_recipe_trains_blocks_9_to_11_from_the_cache(images, tmp_path, capsys):
    row = _run(images, tmp_path, "cached")
    out = capsys.readouterr().out
    assert "depth cache: writing the tokens entering block 9 of 12" in out
    assert "training blocks 9-11 + final norm + head" in out
    assert row["config"]["model"]["depth_cache"] == "auto" and 0.0 <= row["test/acc"] <= 1.0
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert (entry / "tokens.bin").stat().st_size == 3 * 6 * 17 * 16 * 2  # 18 images x 17 tokens x 16 dims, fp16


def test_augmentation_falls_back_to_the_normal_path(images, tmp_path, capsys):
    row = _run(images, tmp_path, "augmented", "--data.augment", "true")
    err = [line for line in capsys.readouterr().err.splitlines() if "depth_cache" in line]
    assert len(err) == 1 and "augmentation is on (data.augment = True)" in err[0] and "normal path" in err[0]
    assert "test/acc" in row and not (tmp_path / "cache").exists()
