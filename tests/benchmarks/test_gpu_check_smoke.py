"""benchmarks/gpu_check.py on the CPU (`--device cpu --quick`): the code paths a GPU run takes, with issue 22's
rows (depth caching, batched prediction, mixed-adapter serving) produced, rendered and checked for equality;
no timing claims."""
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT_DIR))
    import gpu_check

    return gpu_check


def test_depth_cache_and_adapter_bank_rows_on_the_cpu(tmp_path, monkeypatch, capsys):
    gpu_check = _script(monkeypatch)
    torch.set_num_threads(1)
    out = tmp_path / "results"
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "depth_cache,adapter_bank", "--out", str(out)]) == 0
    res = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert md in capsys.readouterr().out
    assert res["matrix"] == [] and res["demos"] == [] and res["steps"] == [] and res["predict"] == {}

    d = res["depth_cache"]
    assert d["ok"] and d["top"] == 1 and d["block"] == 1 and d["storage"] == "fp16" and d["examples"] == 12
    assert [r["key"] for r in d["rows"]] == ["full", "lora_top", "lora_top_cached", "linear_probe"]
    rows = {r["key"]: r for r in d["rows"]}
    assert rows["full"]["ratio"] == 1.0 and rows["full"]["trainable"] > 3e6  # every tensor of the 2-block ViT-S trains
    assert rows["lora_top"]["trainable"] == rows["lora_top_cached"]["trainable"] < rows["full"]["trainable"] / 100
    assert all(math.isfinite(r["step_s"]) and r["step_s"] > 0 and r["step_s_min"] <= r["step_s"] for r in d["rows"])
    # the cached path is the uncached forward from block k on: equal in fp32, within the storage's rounding else
    diffs = d["logit_max_abs_diff"]
    assert diffs["fp32"] < 1e-5 and 0 < diffs["fp16"] < 1e-2 and diffs["bf16"] < 5e-2
    # the cache holds the tokens entering block 1: 12 examples x (1 CLS + 4 patches) x 384 in fp16, + labels
    assert 12 * 5 * 384 * 2 <= d["cache_bytes"] < 2 * 12 * 5 * 384 * 2 and d["fill_s"] > 0
    assert d["caching_epoch_ratio"] > 0
    assert "## Depth caching (issue 22)" in md and "from the depth cache (fp16)" in md and "<= 0.30x" in md

    bank = res["adapter_bank"]
    assert len(bank) == 6 and all(r["ok"] for r in bank)
    vs = next(r["vs_peft_mixed"] for r in bank if "vs_peft_mixed" in r)
    assert vs["min"] > 0 and "ours mixed vs HF peft's mixed batch" in md


@pytest.mark.slow  # four predict CLIs on 10 files each, twice, and a memory run (~20-40 s here)
def test_batched_prediction_row_on_the_cpu(tmp_path, monkeypatch):
    gpu_check = _script(monkeypatch)
    out = tmp_path / "results"
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "predict", "--out", str(out)]) == 0
    p = json.loads((out / "gpu_check.json").read_text())["predict"]
    assert p["ok"] and [r["domain"] for r in p["rows"]] == ["audio", "medical", "vision", "text"]
    for r in p["rows"]:
        assert r["before"]["files"] == r["after"]["files"] == 10 and r["after"]["files_per_s"] > 0
    assert p["rss"][0]["files"] == 10 and "run on the CPU (no device option)" in p["where"]
    md = (out / "gpu_check.md").read_text()
    assert "## Batched prediction (issue 22" in md and "| audio | tiny random |" in md


def test_bad_arguments_are_one_line(monkeypatch, capsys):
    gpu_check = _script(monkeypatch)
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--only", "depth,predict"])
    assert e.value.code == 2 and "--only: unknown ['depth']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--device", "cuda"]) == 2
        assert "no CUDA device visible" in capsys.readouterr().err
