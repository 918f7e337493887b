"""`python -m vision.train` under DDP (2 CPU ranks, gloo) scores the test split exactly like one process.

The model is evaluated untrained (max_epochs 0): training itself legitimately differs under DDP (each
rank's batch statistics, the distributed shuffle, per-rank loss means), while the evaluation of one set
of weights must not. 15 validation images over 2 ranks: a sampler that pads the last share with a
repeated image, or meters that are not reduced across ranks, change the numbers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vision.synthetic import write_pascal_context_like

ROOT = Path(__file__).resolve().parents[2]


def train(args, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "vision.train", *args, "--output_dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_two_cpu_ranks_give_the_one_rank_test_metrics(tmp_path):
    data = write_pascal_context_like(tmp_path / "PASCAL_MT", train=8, val=15, size=32, seed=5)
    demo = ["--data.root", str(data), "--data.size", "32", "--data.batch_size", "4", "--data.cache", "true",
            "--model.backbone", "tiny-swin",
            "--model.backbone_kwargs", "{img_size: 32, embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4], window_size: 4}",
            "--model.methods", "[{name: polyhistor_lite, bottleneck: 8, rank: 4, templates: 4, embed_dim: 16, proj_dim: 16}]",
            "--model.decoder_width", "32", "--trainer.max_epochs", "0", "--trainer.accelerator", "cpu"]
    one = train(demo, tmp_path / "one")
    two = train([*demo, "--trainer.strategy", "ddp", "--trainer.devices", "2"], tmp_path / "two")
    assert one["definition"] == two["definition"] == {t: "reference" for t in one["tasks"]}
    assert one["test"].keys() == two["test"].keys()
    for task, metrics in one["test"].items():
        for k, v in metrics.items():
            # the same weights; batches of other sizes can move a logit by float rounding only
            assert math.isclose(two["test"][task][k], v, rel_tol=1e-4, abs_tol=1e-6), (task, k, v, two["test"][task][k])
