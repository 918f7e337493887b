"""Every training CLI on two processes (CPU, gloo) scores the test split as one process does.

Each domain's demo recipe runs twice on the same data, whose validation and test splits have an ODD
number of samples (so a distributed sampler pads them with a repeated sample): once in one process
and once under `--trainer.strategy ddp --trainer.devices 2` (the probes: `torchrun --nproc_per_node
2`). The learning rate is 0, so both runs test the same weights and their test metrics must agree to
float tolerance: a repeated sample counted, or a metric not reduced over the processes, shows. The
two-process run writes one results folder (nothing left beside it) and each epoch line once.
`medical.train` and `medical.segment` also run sharded (FSDP2: `--trainer.strategy ModelParallelStrategy`,
which Lightning runs on CPU processes too). Vision's two-process test is in tests/vision/test_ddp_eval.py.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
ONE = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
FSDP2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ModelParallelStrategy",
         "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PEFT_SUITE_STAGE_DIR", None)
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _test_metrics(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if k.startswith("test/") and isinstance(v, (int, float))}


def _assert_close(one: dict[str, float], two: dict[str, float], tol: float = 1e-5) -> None:
    print("1 process:  ", {k: round(v, 6) for k, v in one.items()})  # shown by pytest -rP
    print("2 processes:", {k: round(v, 6) for k, v in two.items()})
    assert one and one.keys() == two.keys(), (one, two)
    for k in one:
        both_nan = isinstance(one[k], float) and math.isnan(one[k]) and math.isnan(two[k])
        assert both_nan or two[k] == pytest.approx(one[k], abs=tol), f"{k}: 1 process {one[k]}, 2 processes {two[k]}"


def _train_twice(tmp_path: Path, module: str, recipe: str, data_flag: str, data_root: Path, *extra: str,
                 runs: tuple[str, ...] = ("one", "two"), strategy: list[str] = DDP):
    """(1-process metrics row, 2-process metrics row, 2-process stdout) of one recipe at lr 0."""
    rows, out = {"one": None}, ""
    for name, devices in (("one", ONE), ("two", strategy)):
        if name not in runs:
            continue
        parent = tmp_path / name
        parent.mkdir()
        stdout = _run([sys.executable, "-m", module, "--config", str(ROOT / recipe), data_flag, str(data_root),
                       "--output_dir", str(parent / "run"), "--model.lr", "0", "--trainer.max_epochs", str(EPOCHS),
                       *extra, *devices], cwd=tmp_path)
        assert sorted(p.name for p in parent.iterdir()) == ["run"]  # one results folder, no staging left
        rows[name] = json.loads((parent / "run" / "metrics.json").read_text())
        log = (parent / "run" / "train.log").read_text().splitlines()
        assert [line.split(":")[0] for line in log] == [f"epoch {e}/{EPOCHS}" for e in range(1, EPOCHS + 1)], log
        out = stdout
    for e in range(1, EPOCHS + 1):
        assert sum(line.startswith(f"epoch {e}/{EPOCHS}:") for line in out.splitlines()) == 1, out
    return rows["one"], rows["two"], out


def _odd(n: int, what: str) -> None:
    assert n % 2 == 1, f"{what}: {n} samples; the test needs an odd number (2 processes pad it)"


def test_audio_train_two_processes(tmp_path):
    from audio.datasets import ESC50DataModule
    from audio.synthetic import write_esc50_like

    data = write_esc50_like(tmp_path / "esc50", num_classes=3, clips_per_fold=3, seconds=1.0)
    dm = ESC50DataModule(str(data), test_fold=1, target_frames=200)
    dm.setup("fit")
    _odd(len(dm.splits["test"]), "test"), _odd(len(dm.splits["val"]), "val")
    one, two, _ = _train_twice(tmp_path, "audio.train", "domains/audio/demo.yaml", "--data.init_args.root", data,
                               "--data.init_args.cache_dir", str(tmp_path / "fbank"))
    _assert_close(_test_metrics(one), _test_metrics(two))


def test_medical_train_two_processes(tmp_path):
    from medical.synthetic import write_image_folder

    data = write_image_folder(tmp_path / "images", per_class={"train": 4, "val": 3, "test": 3})  # 3 classes: 9 / 9
    one, two, _ = _train_twice(tmp_path, "medical.train", "domains/medical/demo.yaml", "--data.init_args.root", data)
    _assert_close(_test_metrics(one), _test_metrics(two))


def test_medical_train_sharded_fsdp2(tmp_path):
    """ModelParallelStrategy (FSDP2 through configure_model) on two CPU processes: the sharded run trains,
    tests and saves as one process does (the bundle's tensors gathered whole: the same bytes at lr 0)."""
    from safetensors.torch import load_file

    from medical.synthetic import write_image_folder

    data = write_image_folder(tmp_path / "images", per_class={"train": 4, "val": 3, "test": 3})
    one, two, _ = _train_twice(tmp_path, "medical.train", "domains/medical/demo.yaml", "--data.init_args.root", data,
                               strategy=FSDP2)
    _assert_close(_test_metrics(one), _test_metrics(two))
    a, b = (load_file(tmp_path / n / "run" / "adapter" / "adapter.safetensors") for n in ("one", "two"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    best = next((tmp_path / "two" / "run").rglob("best.ckpt"))
    assert best.is_dir() and len(list(best.glob("*.distcp"))) == 2  # one shard per process


@pytest.mark.parametrize("strategy", [DDP, FSDP2], ids=["ddp", "fsdp2"])
def test_medical_segment_two_processes(tmp_path, strategy):
    import lightning as L
    import yaml

    from medical.data.lung_masks import LungMaskDataModule
    from medical.segmentation import Segmenter, SegmentationModule, load_segmenter
    from medical.synthetic import write_lung_masks

    data = write_lung_masks(tmp_path / "lung_masks", n=20)
    dm = LungMaskDataModule(str(data), img_size=64, batch_size=8)  # as the recipe
    dm.setup("fit")
    _odd(len(dm.dataset("test")), "test"), _odd(len(dm.dataset("val")), "val")
    _, two, _ = _train_twice(tmp_path, "medical.segment", "domains/medical/segment_demo.yaml",
                             "--data.init_args.root", data, runs=("two",), strategy=strategy)
    # The decoder's BatchNorm statistics follow each process's training batches, so the weights of the
    # two runs differ: the reference is the two-process run's own bundle tested in this one process.
    recipe = yaml.safe_load((ROOT / "domains" / "medical" / "segment_demo.yaml").read_text())["model"]
    module = SegmentationModule(**recipe, num_classes=dm.num_classes, labels=dm.labels)
    module.model = Segmenter(*load_segmenter(tmp_path / "two" / "run" / "adapter")[:2])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    one = trainer.test(module, datamodule=dm, verbose=False)[0]
    _assert_close(_test_metrics(one), _test_metrics(two))


def test_text_train_two_processes(tmp_path):
    from text.datamodules import JargonDataModule
    from text.synthetic import write_demo_data

    data = tmp_path / "jargon"
    data.mkdir()
    write_demo_data(data)
    split = {"split": "reader", "test": 0.34, "val": 0.17, "max_length": 66}  # 143 test / 69 validation windows
    dm = JargonDataModule(str(data), tokenizer={"kind": "hash", "vocab_size": 1024}, **split)
    dm.setup("fit")
    _odd(len(dm.windows("test")), "test windows"), _odd(len(dm.windows("val")), "val windows")
    flags = [a for k, v in split.items() for a in (f"--data.init_args.{k}", str(v))]
    one, two, _ = _train_twice(tmp_path, "text.train", "domains/text/demo.yaml", "--data.init_args.root", data, *flags)
    _assert_close(_test_metrics(one), _test_metrics(two))
    assert "test/loss" in _test_metrics(two)  # over the windows: reduced over both processes, none twice


def _probe_twice(tmp_path: Path, module: str, args: list[str]) -> tuple[Path, Path, str]:
    outs, stdout = {}, ""
    for name in ("one", "two"):
        parent = tmp_path / name
        parent.mkdir()
        launch = [sys.executable, "-m", module] if name == "one" else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module]
        stdout = _run([*launch, *args, "--output_dir", str(parent / "run"),
                       "--cache_dir", str(tmp_path / f"cache_{name}")], cwd=tmp_path)
        assert sorted(p.name for p in parent.iterdir()) == ["run"]
        outs[name] = parent / "run"
    return outs["one"], outs["two"], stdout


def test_audio_probe_two_processes(tmp_path):
    one, two, stdout = _probe_twice(tmp_path, "audio.probe", [
        "--config", str(ROOT / "domains" / "bioacoustic" / "demo.yaml"), "--data.init_args.root", str(tmp_path / "birds"),
        "--epochs", "5", "--time_recompute", "false", "--accelerator", "cpu"])
    kinds = sorted(p.name for p in one.iterdir() if p.is_dir())
    assert kinds and sorted(p.name for p in two.iterdir() if p.is_dir()) == kinds
    for kind in kinds:
        m1, m2 = (json.loads((o / kind / "metrics.json").read_text()) for o in (one, two))
        _assert_close(_test_metrics(m1), _test_metrics(m2), tol=1e-4)  # tokens from other batches: float noise
    lines = [line for line in stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == len(set(lines)) > 0  # process 0 alone trains and prints


def test_medical_probe_two_processes(tmp_path):
    from medical.synthetic import write_image_folder

    data = write_image_folder(tmp_path / "images", per_class={"train": 8, "val": 3, "test": 3})  # 24 / 9 / 9: k up to 20
    one, two, _ = _probe_twice(tmp_path, "medical.probe", [
        "--config", str(ROOT / "domains" / "medical" / "probe_demo.yaml"), "--data.init_args.root", str(data),
        "--epochs", "3", "--accelerator", "cpu"])
    for kind in ("knn", "linear"):
        m1, m2 = (json.loads((o / kind / "metrics.json").read_text()) for o in (one, two))
        _assert_close(_test_metrics(m1), _test_metrics(m2), tol=1e-4)
