"""Issue 17 (audio.predict inputs): results streamed file by file, and one silence rule for the AST
and Bird-MAE paths (a silent file is refused naming it, unless --allow-silent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio import predict
from audio.features import SILENCE_PEAK, AudioError, FbankConfig, check_silence, features
from shared import backbones, peft
from shared.heads import LinearHead

KW = {"max_length": 100, "num_mel_bins": 128, "hidden_size": 32, "layers": 2, "heads": 4}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audio_inputs")
    bb = backbones.create("tiny-ast", **KW)
    peft.attach(bb, [], backbone_id="tiny-ast")
    peft.save(peft.Classifier(bb, LinearHead(32, 2, pool="mean"), labels=["tone", "noise"]), tmp / "bundle",
              preprocessing=FbankConfig(target_frames=100).to_dict(), backbone_id="tiny-ast", backbone_kwargs=KW,
              extra={"task": "classification"})
    return tmp / "bundle"


def _wav(path: Path, peak: float, seconds: float = 0.5, sr: int = 16_000, subtype: str = "FLOAT") -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (peak * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, subtype=subtype)
    return path


def _names(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith(" ")]


# ------------------------------------------------------------------------------------ silence

def test_silent_file_is_refused_naming_it_and_allowed_with_a_warning(bundle, tmp_path, capsys):
    silent = _wav(tmp_path / "silent.wav", 0.0)
    hiss = _wav(tmp_path / "dither.wav", 3e-5, subtype="PCM_16")  # +-1 LSB of 16-bit PCM: still silence
    tone = _wav(tmp_path / "tone.wav", 0.3)
    assert predict.main(["--adapter", str(bundle), str(silent), str(hiss), str(tone)]) == 2
    out, err = capsys.readouterr()
    assert _names(out) == [str(tone)]  # was: the silent files predicted ("0.565 tone") and exit 0
    errs = err.strip().splitlines()
    assert errs[0].startswith(f"error: {silent}: silent audio (peak |sample| 0,") and "--allow-silent" in errs[0]
    assert errs[1].startswith(f"error: {hiss}: silent audio") and len(errs) == 2

    assert predict.main(["--adapter", str(bundle), "--allow-silent", str(silent), str(tone)]) == 0
    out, err = capsys.readouterr()
    assert _names(out) == [str(silent), str(tone)]
    assert err.startswith(f"warning: {silent}: silent audio") and len(err.strip().splitlines()) == 1


def test_one_rule_for_the_ast_and_the_bird_paths(tmp_path):
    from audio.birds.frontend import read_clip

    quiet = _wav(tmp_path / "quiet.wav", SILENCE_PEAK / 2, sr=32_000)
    audible = _wav(tmp_path / "audible.wav", SILENCE_PEAK * 20, sr=32_000)
    for read in (lambda p, **kw: features(p, FbankConfig(target_frames=100), **kw), lambda p, **kw: read_clip(p, **kw)):
        with pytest.raises(AudioError, match=r"quiet.wav: silent audio \(peak \|sample\| 5e-05, below 0.0001\)"):
            read(quiet)  # the bird path refused only exact zeros, the AST path nothing at all
        read(quiet, allow_silent=True)
        read(audible)
    with pytest.raises(AudioError, match=r"quiet.wav: silent audio in 0.1-0.3 s"):
        read_clip(quiet, 0.1, 0.3)
    import torch

    assert check_silence(torch.full((10,), 0.5), "x") is None
    assert "predicted anyway" in check_silence(torch.zeros(10), "x", allow_silent=True)


# ------------------------------------------------------------------------------------ streaming

def test_results_are_printed_as_each_file_is_done(bundle, tmp_path, capsys, monkeypatch):
    """A crash while reading file 4 keeps what files 1-3 printed: file 1's result and file 2's error
    were on the streams before file 3 was read (one file per batch, decoded here: the old path;
    tests/audio/test_predict_batches.py has the batched one)."""
    files = [_wav(tmp_path / "a.wav", 0.3), tmp_path / "missing.wav", _wav(tmp_path / "c.wav", 0.2),
             _wav(tmp_path / "d.wav", 0.1)]
    real = predict.read_audio
    seen = []

    def read(path, *a, **kw):
        seen.append(path)
        if len(seen) == 3:
            so_far = capsys.readouterr()
            assert _names(so_far.out) == [str(files[0])] and f"error: {files[1]}: file not found" in so_far.err
            print(so_far.out, end="")
        if len(seen) == 4:
            raise RuntimeError("decoder crashed")
        return real(path, *a, **kw)

    monkeypatch.setattr(predict, "read_audio", read)
    with pytest.raises(RuntimeError, match="decoder crashed"):
        predict.main(["--adapter", str(bundle), "--batch-size", "1", "--workers", "0", *map(str, files)])
    assert _names(capsys.readouterr().out) == [str(files[0]), str(files[2])]


def test_predict_still_returns_the_list(bundle, tmp_path):
    model = peft.from_bundle(bundle)
    cfg = predict.frontend_config(peft.read_meta(bundle))
    wav = _wav(tmp_path / "a.wav", 0.3)
    errors: list[str] = []
    out = predict.predict(model, cfg, [str(wav), str(tmp_path / "nope.wav")], top_k=2, errors=errors)
    assert [p for p, _ in out] == [str(wav)] and len(out[0][1]) == 2
    assert errors == [f"{tmp_path / 'nope.wav'}: file not found"]
    with pytest.raises(AudioError, match="nope.wav: file not found"):
        predict.predict(model, cfg, [str(tmp_path / "nope.wav")])
