"""Smoke test of benchmarks/adapter_bank.py --quick (a 1-block 32 px ViT-S): every row is produced and the
mixed outputs equal one adapter at a time; no timing claims."""
import json
import math
from pathlib import Path

import pytest

SCRIPT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
KEYS = ["lora/peft_one", "lora/peft_mixed", "lora/ours_one", "lora/ours_mixed", "adapter/ours_one", "adapter/ours_mixed"]


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT_DIR))
    import adapter_bank

    return adapter_bank


def test_quick_run_writes_every_row(tmp_path, monkeypatch, capsys):
    adapter_bank = _script(monkeypatch)
    out = tmp_path / "results"
    assert adapter_bank.main(["--quick", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads((out / "adapter_bank.json").read_text())
    md = (out / "adapter_bank.md").read_text()
    assert md in capsys.readouterr().out  # the table is printed too
    assert sorted(p.name for p in out.iterdir()) == ["adapter_bank.json", "adapter_bank.md"]

    cfg = res["config"]
    assert cfg["backbone"] == "vit_small_patch16_224" and cfg["pretrained"] is False
    assert cfg["backbone_kwargs"] == {"img_size": 32, "depth": 1} and cfg["batch"] == 8 and cfg["adapters"] == 8
    assert cfg["threads"] == 1 and cfg["reps"] == 2 and cfg["versions"]["peft"]
    assert [r["key"] for r in res["rows"]] == KEYS
    for r in res["rows"]:
        assert len(r["times_s"]) == 2 and r["min_s"] == min(r["times_s"]) and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert math.isfinite(r["rows_per_s"]) and r["rows_per_s"] > 0
    for group in ("lora/peft", "lora/ours", "adapter/ours"):
        assert res["ratios"][group]["min"] > 0
    d = res["max_abs_diff"]
    assert d["lora/ours_mixed"] < 1e-5 and d["adapter/ours_mixed"] < 1e-5 and d["lora/peft_mixed"] < 1e-5
    assert d["lora/ours_vs_peft"] < 1e-5  # ours and HF peft's mixed batch agree
    assert d["lora/mixed_vs_one"] > 1e-3 and d["adapter/mixed_vs_one"] > 1e-3  # the rows really use 8 adapters
    assert "| LoRA r8 a16 on qkv | peft, mixed 8 |" in md and "| adapter ffn parallel b64 | ours, mixed 8 |" in md
    assert res["loadavg_start"] in md


def test_bad_options_exit_with_one_line(monkeypatch, capsys):
    adapter_bank = _script(monkeypatch)
    with pytest.raises(SystemExit) as e:
        adapter_bank.main(["--quick", "--adapters", "9"])
    assert e.value.code == 2 and "--adapters 9 is more than --batch 8" in capsys.readouterr().err
