"""Issue 8 (audio as a newcomer meets it): truncated files, predict's bad inputs, bundle domain
checks, demo folders, FSDD layout, offline checkpoints, CLI help and config errors."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from audio.features import AudioError, read_audio


def _signal(n: int = 48_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.5 * np.sin(np.arange(n) / 5) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_truncated_flac_and_ogg_are_refused(tmp_path, fmt):
    full = tmp_path / f"clip.{fmt.lower()}"
    sf.write(full, _signal(), 16_000, format=fmt)
    assert read_audio(full).numel() == 48_000
    for frac in (0.5, 0.9):
        cut = tmp_path / f"cut{int(frac * 100)}.{fmt.lower()}"
        cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * frac)])
        with pytest.raises(AudioError, match=rf"{cut.name}: truncated"):
            read_audio(cut)


def test_truncated_ogg_reads_what_is_there_when_allowed(tmp_path):
    full = tmp_path / "clip.ogg"
    sf.write(full, _signal(), 16_000, format="OGG")
    cut = tmp_path / "cut.ogg"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.9)])
    part = read_audio(cut, allow_truncated=True)
    assert 20_000 < part.numel() < 48_000


def test_streamed_wav_with_placeholder_sizes_is_not_truncated(tmp_path):
    # Writers that stream (ffmpeg to a pipe) leave 0xFFFFFFFF in the RIFF and data sizes.
    x = (_signal(8_000) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16_000, 32_000, 2, 16)
    p = tmp_path / "streamed.wav"
    p.write_bytes(b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF) + x)
    assert read_audio(p).numel() == 8_000


def test_a_folder_given_as_a_file_says_is_a_folder(tmp_path):
    with pytest.raises(AudioError, match=rf"{tmp_path.name}: is a folder"):
        read_audio(tmp_path)


# --------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def audio_bundle(tmp_path_factory):
    """A small AST classification bundle as audio.train saves it (no training needed to test predict)."""
    from audio.features import FbankConfig
    from shared import backbones, peft
    from shared.heads import LinearHead

    tmp = tmp_path_factory.mktemp("audio_bundle")
    kw = {"max_length": 100, "num_mel_bins": 128, "hidden_size": 32, "layers": 2, "heads": 4}
    bb = backbones.create("tiny-ast", **kw)
    peft.attach(bb, [peft.Adapter(placement="ffn", mode="parallel", bottleneck=4)], backbone_id="tiny-ast")
    clf = peft.Classifier(bb, LinearHead(32, 3, pool="mean"), labels=["a", "b", "c"])
    torch.nn.init.normal_(clf.head.fc.weight, std=1.0)
    peft.save(clf, tmp / "bundle", preprocessing=FbankConfig(target_frames=100).to_dict(), backbone_id="tiny-ast",
              backbone_kwargs=kw, extra={"task": "classification", "multilabel": False})
    return tmp / "bundle"


def _wav(path: Path, seconds: float = 0.5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(path, (0.3 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32), 16_000, subtype="PCM_16")
    return path


def test_predict_reports_bad_files_and_predicts_the_good_ones(audio_bundle, tmp_path, capsys):
    from audio import predict

    good1, good2 = _wav(tmp_path / "good1.wav"), _wav(tmp_path / "good2.wav", seed=1)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(_wav(tmp_path / "whole.wav", 1.0).read_bytes()[:16_000])
    folder = tmp_path / "a_folder"
    folder.mkdir()
    rc = predict.main(["--adapter", str(audio_bundle), "--top-k", "2", str(good1), str(cut), str(folder), str(good2)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [str(good1), str(good2)]
    assert len([line for line in out.splitlines() if line.startswith(" ")]) == 4  # top-2 each
    errs = err.strip().splitlines()
    assert len(errs) == 2
    assert errs[0].startswith(f"error: {cut}: truncated audio") and "--allow-truncated" in errs[0]
    assert errs[1] == f"error: {folder}: is a folder, not an audio file"
    # the same good files alone: exit 0, and the same probabilities as when a bad file was among them
    assert predict.main(["--adapter", str(audio_bundle), "--top-k", "2", str(good1), str(good2)]) == 0
    assert capsys.readouterr().out == out
    # --allow-truncated predicts the truncated file from the samples present
    assert predict.main(["--adapter", str(audio_bundle), "--allow-truncated", str(cut)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(cut)


def test_predict_help_documents_every_argument(capsys):
    from audio import predict

    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m audio.predict")
    for action in predict.parser()._actions:
        assert action.help, action.dest
    for arg in ("--adapter BUNDLE", "--top-k K", "--allow-truncated", "FILE", "exit codes"):
        assert arg in text


def test_medical_bundle_given_to_audio_predict_is_one_line(tmp_path, capsys):
    from audio import predict
    from medical.transforms import preprocessing_dict
    from shared import backbones, peft
    from shared.heads import LinearHead

    bb = backbones.create("tiny-vit")
    peft.attach(bb, [], backbone_id="tiny-vit")
    peft.save(peft.Classifier(bb, LinearHead(32, 2), labels=["x", "y"]), tmp_path / "med",
              preprocessing=preprocessing_dict(32), backbone_id="tiny-vit", extra={"task": "classification"})
    assert predict.main(["--adapter", str(tmp_path / "med"), str(_wav(tmp_path / "c.wav"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "use python -m medical.predict" in err and "adapter.json" in err


# --------------------------------------------------------------------------- demo folders

def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    from audio.train import main

    mine = tmp_path / "my_esc50"
    (mine / "meta").mkdir(parents=True)
    (mine / "meta" / "esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n")
    (mine / "notes.txt").write_text("my data")
    with pytest.raises(ValueError, match=r"my_esc50: this folder holds files the demo did not write.*--config"):
        main(["--data.root", str(mine), "--trainer.max_epochs", "0"])
    assert sorted(p.name for p in mine.iterdir()) == ["meta", "notes.txt"]  # nothing written
    assert (mine / "meta" / "esc50.csv").read_text().count("\n") == 1


def test_demo_writes_into_a_new_folder_and_marks_it(tmp_path):
    from audio.synthetic import write_esc50_like
    from shared.cli import DEMO_MARKER, prepare_demo_data

    calls = []
    root = prepare_demo_data(tmp_path / "new", lambda r: calls.append(write_esc50_like(r, num_classes=1,
                                                                                       clips_per_fold=1, seconds=0.1)),
                             "synthetic")
    assert (root / DEMO_MARKER).is_file() and (root / "meta" / "esc50.csv").is_file() and len(calls) == 1
    prepare_demo_data(root, lambda r: calls.append(r), "synthetic")  # ours: reused
    assert len(calls) == 2


# --------------------------------------------------------------------------- FSDD

def _fake_fsdd(root: Path, speakers=("george", "jackson", "lucas", "nicolas", "theo", "yweweler"), takes=3) -> Path:
    (root / "recordings").mkdir(parents=True)
    for d in range(10):
        for s in speakers:
            for t in range(takes):
                sf.write(root / "recordings" / f"{d}_{s}_{t}.wav", np.zeros(800, np.float32) + 0.01 * d, 8000)
    return root


def test_fsdd_datamodule_holds_out_speakers_by_default(tmp_path):
    from audio.fsdd import FSDDDataModule, WORDS

    fsdd = _fake_fsdd(tmp_path / "fsdd")
    dm = FSDDDataModule(str(fsdd), cache_dir=str(tmp_path / "c"))
    speakers = {s: {p.name.split("_")[1] for p, _ in items} for s, items in dm.splits.items()}
    assert speakers == {"test": {"theo"}, "val": {"nicolas"}, "train": {"george", "jackson", "lucas", "yweweler"}}
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 120, "val": 30, "test": 30}
    assert dm.labels == WORDS and all(int(p.name[0]) == y for p, y in dm.splits["test"])
    assert dm.protocol.startswith("speaker-disjoint")
    with pytest.raises(ValueError, match=r"the take split leaves \['train', 'val'\] empty"):  # only takes 0-2
        FSDDDataModule(str(fsdd), split="take", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="speakers \\['bob'\\] are not in the data"):
        FSDDDataModule(str(fsdd), test_speakers=["bob"], cache_dir=str(tmp_path / "c"))


def test_fsdd_take_split_is_fsdds_own(tmp_path):
    from audio.fsdd import FSDDDataModule

    fsdd = _fake_fsdd(tmp_path / "fsdd", speakers=("george", "theo"), takes=12)
    dm = FSDDDataModule(str(fsdd), split="take", cache_dir=str(tmp_path / "c"))
    takes = {s: sorted({int(p.stem.split("_")[2]) for p, _ in v}) for s, v in dm.splits.items()}
    assert takes == {"test": [0, 1, 2, 3, 4], "val": [5, 6, 7, 8, 9], "train": [10, 11]}


def test_fsdd_recipe_names_the_datamodule_and_the_speaker_split():
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[2] / "domains/audio/data/fsdd.yaml").read_text())
    assert recipe["data"]["class_path"] == "audio.fsdd.FSDDDataModule"
    assert recipe["data"]["init_args"]["split"] == "speaker"
    assert recipe["model"]["backbone_kwargs"]["max_length"] == recipe["data"]["init_args"]["target_frames"] == 100


def test_fsdd_layout_written_with_other_speakers_is_rewritten(tmp_path):
    """Issue 13.6: an existing layout written with other speakers was silently reused."""
    from audio.fsdd import write_speech_commands_layout

    fsdd = _fake_fsdd(tmp_path / "fsdd", speakers=("george", "jackson", "theo"))
    root = write_speech_commands_layout(fsdd, tmp_path / "gsc", speakers=["george"], split="take")
    assert {p.name.split("_")[1] for p in root.glob("*/*.wav")} == {"george"}
    root = write_speech_commands_layout(fsdd, tmp_path / "gsc", speakers=["george", "jackson"], split="take")
    assert {p.name.split("_")[1] for p in root.glob("*/*.wav")} == {"george", "jackson"}
    tests = (root / "testing_list.txt").read_text().split()
    assert len(tests) == 10 * 2 * 3 and any("_jackson_" in t for t in tests)
    # a speaker split of the same speakers: jackson (the last kept) is held out for test
    root = write_speech_commands_layout(fsdd, tmp_path / "gsc", speakers=["george", "jackson"])
    assert {t.split("_")[1] for t in (root / "testing_list.txt").read_text().split()} == {"jackson"}
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("not ours")
    with pytest.raises(ValueError, match="other: not empty and not an FSDD layout"):
        write_speech_commands_layout(fsdd, other, split="take")


# --------------------------------------------------------------------------- offline checkpoints

def test_ast_offline_without_cache_fails_fast_in_one_line(tmp_path, monkeypatch):
    import time

    from audio import backbone

    monkeypatch.setattr(backbone, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    t0 = time.time()
    with pytest.raises(backbone.CheckpointUnavailable) as e:
        backbone.load_ast("MIT/ast-finetuned-audioset-10-10-0.4593", max_length=100)
    assert time.time() - t0 < 20
    msg = str(e.value)
    assert "\n" not in msg and "'MIT/ast-finetuned-audioset-10-10-0.4593'" in msg
    assert "download it once while online" in msg and "--model.backbone_kwargs.checkpoint" in msg
    with pytest.raises(backbone.CheckpointUnavailable, match="not a folder written by save_pretrained"):
        backbone.load_ast(str(tmp_path))
    with pytest.raises(backbone.CheckpointUnavailable, match="ast_typo: not found"):
        backbone.load_ast(str(tmp_path / "ast_typo"))


def test_hub_reachable_is_false_in_offline_mode(monkeypatch):
    from shared.checkpoints import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


# --------------------------------------------------------------------------- CLI help, config errors, output

def test_train_help_opens_with_our_usage(capsys):
    from audio.train import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: ") and "--config RECIPE.yaml" in lines[0]
    head = "\n".join(lines[:8])
    assert "offline demo" in head and "domains/audio" in head and "--print_config" in head


@pytest.mark.parametrize("text, line, what", [
    ("model:\n  backbone: tiny-ast\n  lrr: 0.1\n", 3, "does not accept option 'lrr'"),
    ("model:\n  backbone: [tiny\n  lr: 1\n", 3, "YAML syntax error"),
])
def test_config_errors_name_the_recipe_file_and_line(tmp_path, capsys, text, line, what):
    from shared.cli import friendly
    from audio.train import main

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert friendly(main, ["--config", str(recipe)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "usage" not in captured.out + err
    assert err.startswith(f"error: {recipe} line {line}: ") and what in err
    if "lrr" in what:
        assert "--print_config" in err


def test_quiet_lightning_drops_chatter_and_keeps_warnings():
    import logging

    from shared.cli import quiet_lightning

    quiet_lightning()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    keep = logging.makeLogRecord({"msg": "Epoch 3: something useful", "levelno": logging.INFO})
    for msg in ("💡 Tip: For seamless cloud logging", "Restoring states from the checkpoint path at "
                "/x/.run.staging-abc/checkpoints/best.ckpt", "GPU available: False, used: False"):
        assert not log.filters[-1].filter(logging.makeLogRecord({"msg": msg}))
    assert log.filters[-1].filter(keep)


def test_train_output_is_short_and_says_where_results_went(tmp_path):
    """Issue 8.7, as a user sees it (a subprocess whose stdout is a log file, not a terminal): no
    Lightning tips / tensorboardX notice / deprecation warnings / staging-folder lines; one line per
    epoch; the paths of metrics.json and the logs; the whole output fits on one screen."""
    import os
    import subprocess
    import sys

    from audio.synthetic import write_esc50_like

    data = write_esc50_like(tmp_path / "esc50", num_classes=2, clips_per_fold=1, seconds=0.5)
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PEFT_SUITE_STAGE_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "audio.train", "--output_dir", str(out_dir), "--data.init_args.root", str(data),
         "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.target_frames", "100",
         "--model.backbone_kwargs", "{max_length: 100, num_mel_bins: 128, hidden_size: 16, layers: 1, heads: 2}",
         "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    for noise in ("Tip:", "tensorboardX", "LeafSpec", "Restoring states", ".staging-", "DeprecationWarning",
                  "GPU available", "━━"):
        assert noise not in text, noise
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) <= 24, text
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"] and all("val/acc" in e for e in epochs)
    assert (out_dir / "train.log").read_text().splitlines() == epochs
    assert f"metrics written to {out_dir / 'metrics.json'}; logs: {out_dir / 'train.log'}, " \
           f"{out_dir / 'lightning_logs' / 'version_0'}" in text
    assert (out_dir / "lightning_logs" / "version_0" / "metrics.csv").is_file()


def test_fsdd_recipe_runs_with_lora(tmp_path):
    """`--config domains/audio/data/fsdd.yaml --config .../lora.yaml` on an FSDD-layout fixture: the
    speaker-disjoint split, 10 digit labels and the protocol reach metrics.json and the bundle."""
    import json
    import os

    from audio.train import main

    recipes = Path(__file__).resolve().parents[2] / "domains" / "audio"
    fsdd = _fake_fsdd(tmp_path / "fsdd", takes=1)
    os.environ.pop("PEFT_SUITE_STAGE_DIR", None)
    row = main(["--config", str(recipes / "data" / "fsdd.yaml"), "--config", str(recipes / "methods" / "lora.yaml"),
                "--data.root", str(fsdd), "--model.backbone", "tiny-ast",
                "--model.backbone_kwargs", "{max_length: 100, num_mel_bins: 128, hidden_size: 16, layers: 1, heads: 2}",
                "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "c"), "--trainer.max_epochs", "1",
                "--trainer.logger", "false", "--trainer.accelerator", "cpu", "--output_dir", str(tmp_path / "run")])
    assert row["dataset"] == "fsdd" and row["protocol"] == "speaker-disjoint (1 test, 1 validation speaker)"
    assert row["fold"] == "theo" and row["config"]["data"]["init_args"]["val_speakers"] == ["nicolas"]
    assert row["config"]["data"]["init_args"]["split"] == "speaker"
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter.json").read_text())
    assert meta["labels"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert meta["preprocessing"]["target_frames"] == 100
