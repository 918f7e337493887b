"""audio.predict: top-k labels per file from a bundle trained once by audio.train (module-scoped),
checked against the loaded model run directly, and its clear errors (exit code 2, the file named)
for unreadable audio, a bundle of another frontend and a corrupted tensor file."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from shared.cli import STAGE_ENV


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(bundle folder, [two clips of the test fold], labels), from one short audio.train run."""
    from audio.synthetic import write_esc50_like
    from audio.train import main

    tmp = tmp_path_factory.mktemp("audio_predict")
    data = write_esc50_like(tmp / "esc50", num_classes=3, clips_per_fold=2, seconds=1.0)
    saved = os.environ.pop(STAGE_ENV, None)
    try:
        main(["--output_dir", str(tmp / "run"), "--data.init_args.root", str(data),
              "--data.init_args.cache_dir", str(tmp / "cache"), "--data.init_args.target_frames", "100",
              "--model.backbone_kwargs", "{max_length: 100, num_mel_bins: 128, hidden_size: 32, layers: 2, heads: 4}",
              "--trainer.max_epochs", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"])
    finally:
        os.environ.pop(STAGE_ENV, None)
        if saved is not None:
            os.environ[STAGE_ENV] = saved
    bundle = tmp / "run" / "adapter"
    wavs = [data / "audio" / "1-1000-A-0.wav", data / "audio" / "1-1021-A-2.wav"]
    assert all(w.is_file() for w in wavs)
    labels = json.loads((bundle / "adapter.json").read_text())["labels"]
    assert labels == ["tone", "chirp", "noise_bursts"]
    return bundle, [str(w) for w in wavs], labels


def parse(out: str) -> list[tuple[str, list[tuple[float, str]]]]:
    """predict's stdout -> [(file, [(score, label), ...])]."""
    blocks = []
    for line in out.splitlines():
        m = re.fullmatch(r"\s+(-?\d+\.\d+)\s+(\S.*)", line)
        if m:
            blocks[-1][1].append((float(m.group(1)), m.group(2)))
        elif line.strip():
            blocks.append((line, []))
    return blocks


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst)
    return dst


def test_prints_top_k_per_file(trained, capsys):
    from audio.predict import main

    bundle, wavs, labels = trained
    assert main(["--adapter", str(bundle), "--top-k", "2", *wavs]) == 0
    blocks = parse(capsys.readouterr().out)
    assert [f for f, _ in blocks] == wavs  # each file, in the order given
    for _, top in blocks:
        assert len(top) == 2
        scores = [s for s, _ in top]
        assert scores == sorted(scores, reverse=True)
        assert all(0.0 <= s <= 1.0 for s in scores) and sum(scores) <= 1.0 + 1e-3
        assert {lab for _, lab in top} <= set(labels) and len({lab for _, lab in top}) == 2


def test_top_label_is_the_models_argmax(trained, capsys):
    from audio.features import features
    from audio.predict import frontend_config, main
    from shared import peft

    bundle, wavs, labels = trained
    assert main(["--adapter", str(bundle), "--top-k", "2", *wavs]) == 0
    blocks = parse(capsys.readouterr().out)

    model = peft.from_bundle(bundle).eval()
    cfg = frontend_config(peft.read_meta(bundle))
    assert cfg.target_frames == 100
    for (path, top), wav in zip(blocks, wavs):
        with torch.inference_mode():
            probs = model(features(wav, cfg).unsqueeze(0)).softmax(-1)[0]
        assert top[0][1] == labels[int(probs.argmax())]
        assert top[0][0] == pytest.approx(float(probs.max()), abs=1e-3)


def test_predict_probabilities_over_all_classes_sum_to_one(trained):
    from audio.predict import frontend_config, predict
    from shared import peft

    bundle, wavs, labels = trained
    model = peft.from_bundle(bundle)
    cfg = frontend_config(peft.read_meta(bundle))
    out = predict(model, cfg, wavs, top_k=len(labels))
    assert [p for p, _ in out] == wavs
    for _, top in out:
        assert sorted(lab for lab, _ in top) == sorted(labels)
        assert math.isclose(sum(s for _, s in top), 1.0, abs_tol=1e-5)
    # asking for more than there are classes gives every class once
    assert len(predict(model, cfg, wavs[:1], top_k=10)[0][1]) == len(labels)


@pytest.mark.parametrize("kind", ["corrupt", "missing", "empty"])
def test_unreadable_file_exits_2_naming_it(trained, afx, tmp_path, capsys, kind):
    from audio.predict import main

    bundle, wavs, _ = trained
    bad = tmp_path / "bad clip.wav"
    if kind == "corrupt":
        afx.write_wav(bad)
        afx.corrupt(bad)
    elif kind == "empty":
        afx.write_wav(bad, seconds=0.0, sr=16_000)  # a header and no samples (shorter clips are padded)
    assert main(["--adapter", str(bundle), wavs[0], str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err


def test_bundle_of_another_frontend_exits_2(trained, tmp_path, capsys):
    from audio.predict import main

    bundle = copy_bundle(trained[0], tmp_path)
    meta = json.loads((bundle / "adapter.json").read_text())
    meta["preprocessing"] = {"frontend": "mfcc", "target_frames": 100}
    (bundle / "adapter.json").write_text(json.dumps(meta))  # the tensors' sha256 is unchanged
    assert main(["--adapter", str(bundle), trained[1][0]]) == 2
    err = capsys.readouterr().err
    assert "fbank" in err and "preprocessing" in err


def test_bundle_without_preprocessing_exits_2(trained, tmp_path, capsys):
    from audio.predict import main

    bundle = copy_bundle(trained[0], tmp_path)
    meta = json.loads((bundle / "adapter.json").read_text())
    del meta["preprocessing"]
    (bundle / "adapter.json").write_text(json.dumps(meta))
    assert main(["--adapter", str(bundle), trained[1][0]]) == 2
    assert "fbank" in capsys.readouterr().err


def test_fbank_bundle_with_unknown_frontend_setting_exits_2(trained, tmp_path, capsys):
    """A bundle whose `preprocessing` names fbank_ast but carries a setting this version does not
    know (e.g. written by a newer peft-suite) must fail like every other bundle problem: exit
    code 2 and a message naming adapter.json, not a TypeError traceback from FbankConfig(**pre)."""
    from audio.predict import main

    bundle = copy_bundle(trained[0], tmp_path)
    meta = json.loads((bundle / "adapter.json").read_text())
    meta["preprocessing"]["hop_ms"] = 10
    (bundle / "adapter.json").write_text(json.dumps(meta))
    assert main(["--adapter", str(bundle), trained[1][0]]) == 2
    err = capsys.readouterr().err
    assert "hop_ms" in err


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "delete"])
def test_corrupted_tensors_exit_2_naming_the_file(trained, tmp_path, capsys, damage):
    from audio.predict import main

    bundle = copy_bundle(trained[0], tmp_path)
    tensors = bundle / "adapter.safetensors"
    raw = bytearray(tensors.read_bytes())
    if damage == "flip_bytes":
        raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
        tensors.write_bytes(bytes(raw))
    elif damage == "truncate":
        tensors.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        tensors.unlink()
    assert main(["--adapter", str(bundle), trained[1][0]]) == 2
    captured = capsys.readouterr()
    assert str(tensors) in captured.err and captured.out == ""


def test_missing_bundle_exits_2(tmp_path, trained, capsys):
    from audio.predict import main

    assert main(["--adapter", str(tmp_path / "nope"), trained[1][0]]) == 2
    assert str(tmp_path / "nope" / "adapter.json") in capsys.readouterr().err


def test_negative_top_k_is_a_usage_error(trained, capsys):
    """`--top-k -1` must be refused like any bad argument (argparse: exit code 2), not crash with
    `RuntimeError: selected index k out of range` from torch.topk inside predict()."""
    from audio.predict import main

    bundle, wavs, _ = trained
    with pytest.raises(SystemExit) as e:
        main(["--adapter", str(bundle), "--top-k", "-1", wavs[0]])
    assert e.value.code == 2
    assert "top-k" in capsys.readouterr().err
