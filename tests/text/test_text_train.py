"""`python -m text.train` (the offline demo, shortened) and `python -m text.report`."""
from __future__ import annotations

import json

import pytest

from text.report import main as report_main
from text.train import main as train_main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    row = train_main(["--data.root", str(root / "data"), "--output_dir", str(root / "runs" / "tagger"),
                      "--trainer.max_epochs", "2", "--data.init_args.test", "0.5"])
    return root, row


def test_demo_writes_bundle_metrics_and_per_reader_f1(demo_run, capsys):
    root, row = demo_run
    out = root / "runs" / "tagger"
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "train.log").is_file()
    saved = json.loads((out / "metrics.json").read_text())
    readers = sorted(k.split("/")[-1] for k in saved if k.startswith("test/f1_reader/"))
    assert readers == ["r1", "r2", "r3", "r4", "r5", "r6"]
    per = [saved[f"test/f1_reader/{r}"] for r in readers]
    assert saved["test/macro_f1"] == pytest.approx(sum(per) / 6)
    assert 0 <= saved["test/f1"] <= 1 and saved["dataset"] == "jargon-data" and saved["method"] == "lora"
    assert saved["trainable_params"] == 23235  # LoRA r8 on q/k/v/dense/word embeddings of the demo BERT + 3-tag head
    meta = json.loads((out / "adapter" / "adapter.json").read_text())
    assert meta["task"] == "jargon-tagging" and meta["head"]["kind"] == "token"
    assert saved["definition"] == meta["metrics"]["definition"] == "reference"  # familiarity <= 1, docs/metrics.md
    assert sorted(meta["preprocessing"]["readers"]) == readers
    # the synthetic data went into a folder marked as the demo's, and nothing else
    assert sorted(p.name for p in (root / "data").iterdir()) == [".peft-suite-demo", "annotations.csv"]
    report = report_main([str(root / "runs")])
    assert "| tagger | jargon-data | lora | reference |" in report  # the reader table names the definition
    assert (root / "runs" / "report-readers.md").is_file() and (root / "runs" / "report-test-f1.md").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="holds files the demo did not write"):
        train_main(["--data.root", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
