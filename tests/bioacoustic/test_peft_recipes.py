"""PEFT comparison recipes (audio.train + BirdSetDataModule): LoRA / adapter / full on Bird-MAE."""
import json
from pathlib import Path

import pytest
import yaml

RECIPES = Path(__file__).resolve().parents[2] / "domains" / "bioacoustic" / "peft"


@pytest.mark.parametrize("name,method", [("lora", "lora_qkv"), ("adapter", "adapter"), ("full", "full")])
def test_peft_recipes_use_birdmae_settings(name, method):
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    m = r["model"]
    assert m["methods"][0]["name"] == method and m["head"]["kind"] == "prototypical"
    assert (m["multilabel"], m["loss"], m["betas"], m["weight_decay"]) == (True, "asl", [0.9, 0.95], 3.0e-4)
    assert m["lr_groups"] == {"head\\.prototypes": 0.04} and r["data"]["init_args"]["val_fraction"] == 0.1


@pytest.mark.slow
def test_lora_recipe_trains_on_the_demo_data(tmp_path):
    from audio.train import main

    main(["--config", str(RECIPES / "lora.yaml"), "--config", str(RECIPES / "debug.yaml"),
          "--data.init_args.root", str(tmp_path / "birds"), "--output_dir", str(tmp_path / "lora"),
          "--trainer.max_epochs", "1"])
    row = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert 0.0 <= row["test/map"] <= 1.0 and (tmp_path / "lora" / "adapter" / "adapter.json").is_file()
    # BirdSet's own metrics beside the generic module's, and the definition they follow
    assert 0.0 <= row["test/cmap"] <= 1.0 and 0.0 <= row["test/top1"] <= 1.0 and row["definition"] == "reference"
