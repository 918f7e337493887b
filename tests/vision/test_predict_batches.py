"""Issue 22 item 2 (vision.predict in batches): images of any size share a forward (each resized to
the model's input) and every map is written at its own image's size, equal to the file-by-file
maps; an unreadable file is named ("skipped: ...") and the rest of its batch still written."""
from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision import predict
from vision.data import DataError

from .test_predict_inputs import _photo, bundle, model  # noqa: F401  (the tiny Swin bundle fixtures)

SIZES = [(40, 32), (64, 48), (33, 77), (50, 50), (90, 20)]


def _files(tmp_path) -> list[Path]:
    files = [_photo(tmp_path / f"p{i}.png", w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    files.insert(2, _photo(tmp_path / "j.jpg", 45, 30, seed=9, quality=90))
    g16 = (np.random.default_rng(0).random((30, 36)) * 65535).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    return [*files, tmp_path / "g16.png"]


def test_batched_outputs_equal_one_at_a_time(model, tmp_path):  # noqa: F811
    files = _files(tmp_path)
    one = list(predict.iter_outputs(model, files, overview=False, batch_size=1, workers=0))
    batched = list(predict.iter_outputs(model, files, overview=False, batch_size=3, workers=1))
    assert [o[0] for o in one] == [o[0] for o in batched] == files
    for (f, stem, size, pic, a), (_, _, size_b, _, b) in zip(one, batched):
        assert size == size_b and pic is None
        for t in a:
            torch.testing.assert_close(a[t], b[t], atol=1e-5, rtol=1e-5)
    # the same maps as predict() of each file alone
    for f, _, size, _, outs in batched:
        want = predict.predict(model, f)
        got = predict.maps_at(model, outs, size)
        for t in want:
            assert got[t].shape[:2] == size
            assert np.abs(got[t].astype(int) - want[t].astype(int)).max() <= 1, (f, t)


def test_cli_maps_at_each_images_size_and_a_bad_file_skipped(bundle, tmp_path, capsys):  # noqa: F811
    files = _files(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    args = [*map(str, files[:3]), str(tmp_path / "broken.jpg"), str(tmp_path), *map(str, files[3:])]
    maps = {}
    for batch, workers in (("1", "0"), ("3", "1")):
        out = tmp_path / f"out{batch}"
        with pytest.raises(SystemExit) as stop:
            predict.main(["--adapter", str(bundle), "--out", str(out), "--no-overview", "--batch-size", batch,
                          "--workers", workers, *args])
        assert stop.value.code == 2
        got = capsys.readouterr()
        assert [line.split(": ")[0] for line in got.out.splitlines()] == list(map(str, files))  # in input order
        skipped = got.err.strip().splitlines()
        assert skipped[0].startswith(f"skipped: {tmp_path / 'broken.jpg'}: cannot read image")
        assert skipped[1] == f"skipped: {tmp_path}: is a folder, not an image" and len(skipped) == 2
        maps[batch] = {p.name: np.asarray(Image.open(p)) for p in sorted(out.iterdir())}
    assert list(maps["1"]) == list(maps["3"]) and len(maps["1"]) == 2 * len(files)
    for name, a in maps["1"].items():
        assert a.shape == maps["3"][name].shape
        assert np.abs(a.astype(int) - maps["3"][name].astype(int)).max() <= 1, name
    for f in files:  # each map at its own image's size
        w, h = Image.open(f).size
        assert maps["3"][f"{f.stem}_saliency.png"].shape == (h, w)


def test_overviews_are_written_in_batches(bundle, tmp_path, capsys):  # noqa: F811
    files = _files(tmp_path)[:2]
    out = tmp_path / "out"
    predict.main(["--adapter", str(bundle), "--out", str(out), "--batch-size", "2", "--workers", "1", *map(str, files)])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{f}: {out / (f.stem + '_saliency.png')}, {out / (f.stem + '_normals.png')}, "
                     f"{out / (f.stem + '_overview.png')}" for f in files]
    assert all(Image.open(out / f"{f.stem}_overview.png").size[0] > 300 for f in files)


def test_the_loader_can_be_sent_to_spawned_workers(tmp_path):
    load = pickle.loads(pickle.dumps(functools.partial(predict.load_image, image_size=32, max_side=64)))
    with pytest.raises(DataError, match="nope.png"):
        load((tmp_path / "nope.png", "nope"))
    got = load((_photo(tmp_path / "x.png", 100, 50), "x"))
    assert got["x"].shape == (3, 32, 32) and got["size"] == (32, 64) and got["picture"].shape == (50, 100, 3)
