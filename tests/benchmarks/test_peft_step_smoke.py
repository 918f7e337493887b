"""Smoke test of benchmarks/peft_step.py on a tiny random ViT: every row is produced, no timing claims."""
import json
import math
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = [
    "--backbone", "vit_tiny_patch16_224", "--backbone-kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
    "--img", "32", "--batch", "2", "--threads", "1", "--warmup", "0", "--steps", "2",
    "--infer-reps", "1", "--probe-images", "4", "--probe-epochs", "1",
]


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_peft_step_tiny_run_writes_every_row(tmp_path, monkeypatch, capsys):
    # The measurements run in forkserver children, which import the script by module name.
    monkeypatch.syspath_prepend(str(SCRIPT_DIR))
    import peft_step

    out = tmp_path / "results"
    assert peft_step.main([*TINY, "--out", str(out)]) == 0
    res = json.loads((out / "peft_step.json").read_text())
    md = (out / "peft_step.md").read_text()
    assert md.strip() and "| full fine-tuning |" in md
    assert md in capsys.readouterr().out  # the table is printed too

    rows = {r["key"]: r for r in res["train_step"]}
    assert list(rows) == [k for k, _, _ in peft_step.train_configs(depth=1)]
    for key, r in rows.items():
        assert "error" not in r, r
        for field in ("trainable_params", "total_params", "step_s", "step_s_min", "step_ratio",
                      "baseline_rss_gib", "peak_rss_gib", "peak_rss_ratio"):
            assert _positive(r[field]), (key, field, r[field])
        # A tiny model may fit the step into memory already resident, so this one may be 0.
        assert r["peak_above_baseline_gib"] >= 0, (key, r["peak_above_baseline_gib"])
        assert len(r["step_s_all"]) == 2
        assert r["trainable_params"] <= r["total_params"]
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    assert rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]

    inf = {r["model"]: r for r in res["inference"]["rows"]}
    assert set(inf) == {"bare", "lora_unmerged", "lora_merged"}
    assert all(_positive(r["median_s"]) and _positive(r["ratio"]) for r in inf.values())
    assert res["inference"]["merged_max_abs_diff"] < 1e-4

    probe = res["probe_epoch"]
    for field in ("recompute_epoch_s", "cached_epoch_s", "cache_fill_s", "cache_load_s", "speedup"):
        assert _positive(probe[field]), (field, probe[field])

    cfg = res["config"]
    assert cfg["threads"] == 1 and cfg["batch"] == 2 and cfg["img"] == 32 and cfg["cpu"]
    assert cfg["versions"]["torch"]
