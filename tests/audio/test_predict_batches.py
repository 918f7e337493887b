"""Issue 22 item 2 (audio.predict in batches): batched predictions equal the file-by-file ones, clips
of any length stack (the frontends pad / trim to the bundle's frames), a bad file is named at once
and skipped while the rest of its batch is predicted, and results are printed batch by batch."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile as sf

from audio import predict
from audio.features import AudioError
from shared import peft

from .test_predict_inputs import _names, _wav, bundle  # noqa: F401  (the tiny AST bundle fixture)


def _clips(tmp_path):
    """Clips of 0.05-1.7 s at two sample rates (tones and noise), so their raw lengths all differ."""
    rng = np.random.default_rng(0)
    files = []
    for i, (seconds, sr) in enumerate([(0.05, 16_000), (0.5, 16_000), (1.7, 16_000), (0.8, 22_050), (0.3, 8_000),
                                       (1.1, 16_000)]):
        t = np.arange(int(seconds * sr)) / sr
        wave = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)
        files.append(tmp_path / f"clip{i}.wav")
        sf.write(files[-1], wave.astype(np.float32), sr)
    return files


def test_clips_of_any_length_give_inputs_of_one_shape(bundle, tmp_path):  # noqa: F811
    cfg = predict.frontend_config(peft.read_meta(bundle))
    shapes = {tuple(predict.load_clip(str(f), cfg).data.shape) for f in _clips(tmp_path)}
    assert shapes == {(cfg.target_frames, cfg.num_mel_bins)}  # padded / trimmed: they stack


def test_batched_equals_one_at_a_time(bundle, tmp_path):  # noqa: F811
    model = peft.from_bundle(bundle)
    cfg = predict.frontend_config(peft.read_meta(bundle))
    files = [str(f) for f in _clips(tmp_path)]
    one = predict.predict(model, cfg, files, top_k=2, batch_size=1, workers=0)
    batched = predict.predict(model, cfg, files, top_k=2, batch_size=4, workers=1)
    assert [f for f, _ in batched] == [f for f, _ in one] == files
    for (_, a), (_, b) in zip(one, batched):
        assert [lab for lab, _ in a] == [lab for lab, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5, rtol=0)
    assert len({round(a[0][1], 4) for _, a in one}) > 1  # the clips are told apart: a real comparison


def test_a_bad_file_is_named_and_its_batch_still_predicted(bundle, tmp_path, capsys):  # noqa: F811
    files = _clips(tmp_path)[:4]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt not audio")
    silent = _wav(tmp_path / "silent.wav", 0.0)
    args = [str(files[0]), str(bad), str(files[1]), str(silent), str(files[2]), str(files[3])]
    assert predict.main(["--adapter", str(bundle), "--batch-size", "3", "--workers", "1", *args]) == 2
    out, err = capsys.readouterr()
    assert _names(out) == [str(f) for f in files]  # the rest of the bad files' batches, in input order
    errs = err.strip().splitlines()
    assert errs[0].startswith(f"error: {bad}: unreadable audio") and errs[1].startswith(f"error: {silent}: silent audio")
    assert len(errs) == 2
    assert predict.main(["--adapter", str(bundle), "--batch-size", "1", "--workers", "0", *args]) == 2
    assert capsys.readouterr().out == out  # the same lines as one file at a time


def test_results_are_printed_as_each_batch_is_done(bundle, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Batches of 2: files 1-2's results are on stdout before file 4 is read; a crash while reading
    file 6 still prints file 5 (decoded before it, its batch not full)."""
    files = [_wav(tmp_path / f"{i}.wav", 0.1 + 0.05 * i) for i in range(6)]
    real = predict.read_audio
    seen = []

    def read(path, *a, **kw):
        seen.append(path)
        if len(seen) == 4:
            so_far = capsys.readouterr()
            assert _names(so_far.out) == [str(files[0]), str(files[1])]
            print(so_far.out, end="")
        if len(seen) == 6:
            raise RuntimeError("decoder crashed")
        return real(path, *a, **kw)

    monkeypatch.setattr(predict, "read_audio", read)
    with pytest.raises(RuntimeError, match="decoder crashed"):
        predict.main(["--adapter", str(bundle), "--batch-size", "2", "--workers", "0", *map(str, files)])
    assert _names(capsys.readouterr().out) == [str(f) for f in files[:5]]


def test_the_loader_can_be_sent_to_spawned_workers(bundle):  # noqa: F811
    import functools

    cfg = predict.frontend_config(peft.read_meta(bundle))
    load = pickle.loads(pickle.dumps(functools.partial(predict.load_clip, cfg=cfg, allow_silent=True)))
    with pytest.raises(AudioError, match="nope.wav: file not found"):
        load("nope.wav")
