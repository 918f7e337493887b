"""The ACTER method-table recipes (`domains/text/acter/*.yaml`, each on top of the shipped
`acter_minilm_lora.yaml`) load with their own methods and learning rate and leave the shipped recipe's
data and trainer settings as they are; one runs end to end on the fixture corpus with a tiny RANDOM
BERT and writes the table's inputs (intervals, validation score, per-sentence terms)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.text.fixtures import write_acter
from text import train

TEXT = Path(__file__).resolve().parents[2] / "domains" / "text"
BASE = TEXT / "acter_minilm_lora.yaml"
REGIMES = sorted((TEXT / "acter").glob("*.yaml"))


def _resolved(capsys, *configs: Path) -> dict:
    args = [a for c in configs for a in ("--config", str(c))]
    with pytest.raises(SystemExit) as e:
        train.main(args + ["--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_regime_recipes_load_on_top_of_the_shipped_one(capsys):
    assert {p.stem for p in REGIMES} == {"adapter", "bitfit", "full", "probe"}
    base = _resolved(capsys, BASE)
    assert base["model"]["methods"][0]["name"] == "lora" and base["model"]["lr"] == 1e-3
    names = {}
    for recipe in REGIMES:
        own = yaml.safe_load(recipe.read_text())["model"]
        got = _resolved(capsys, BASE, recipe)
        assert got["model"]["methods"] == own["methods"] and got["model"]["lr"] == own["lr"], recipe.name
        names[recipe.stem] = [m["name"] for m in own["methods"]]
        for section in ("data", "trainer", "seed_everything"):  # the shipped subsample, epochs, ... unchanged
            assert got[section] == base[section], (recipe.name, section)
        assert {k: v for k, v in got["model"].items() if k not in ("methods", "lr")} == \
            {k: v for k, v in base["model"].items() if k not in ("methods", "lr")}, recipe.name
    assert names == {"adapter": ["adapter"], "bitfit": ["bitfit"], "full": ["full"], "probe": []}


def test_a_regime_recipe_runs_and_writes_the_table_inputs(tmp_path):
    root = write_acter(tmp_path / "acter")
    out = tmp_path / "run"
    row = train.main(["--config", str(BASE), "--config", str(TEXT / "acter" / "bitfit.yaml"),
                      "--model.backbone", "tiny-bert", "--model.backbone_kwargs", "{vocab_size: 64}",
                      "--data.tokenizer", "{kind: hash, vocab_size: 64}", "--data.root", str(root),
                      "--data.val_fraction", "0.5", "--data.bootstrap", "200", "--trainer.max_epochs", "1",
                      "--trainer.logger", "false", "--output_dir", str(out)])
    assert row["method"] == "bitfit" and row["config"]["model"]["lr"] == 5e-3
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("test/f1", "test/f1_lo", "test/f1_hi", "test/precision_lo", "test/recall_hi", "val/f1_best"):
        assert isinstance(saved[k], float), k
    assert saved["test/f1_lo"] <= saved["test/f1"] <= saved["test/f1_hi"] and saved["torch_threads"] >= 1
    terms = json.loads((out / "test_terms.json").read_text())
    assert len(terms["pred"]) == len(terms["gold_by_sentence"]) == len(terms["doc_ids"]) == 2  # the htfl sentences
    assert set(terms["gold"]) == {"heart failure", "patients", "diuretics", "ejection fraction", "nyha class"}
    assert {"heart failure", "patients", "diuretics"} <= set(terms["gold_by_sentence"][0])
