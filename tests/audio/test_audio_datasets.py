"""audio.datasets: the four data modules on fixtures written in each dataset's real layout."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from audio.datasets import (
    DatasetLayoutError, ESC50DataModule, FluentSpeechCommandsDataModule, SpeechCommandsDataModule,
    UrbanSound8KDataModule,
)
from audio.features import AudioError, FbankConfig, SpecAugment, features


def rel(root: Path, items) -> set[str]:
    return {str(Path(p).relative_to(root)) for p, _ in items}


def esc_fold(path: Path) -> int:
    return int(Path(path).name.split("-")[0])


def first_batch(dm, split="train"):
    dm.setup("fit")
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[split]()
    return next(iter(loader))


def check_batch(batch, frames, num_classes, batch_size):
    x, y = batch
    assert x.dtype == torch.float32 and x.shape == (batch_size, frames, 128)
    assert y.dtype == torch.int64 and y.shape == (batch_size,)
    assert ((0 <= y) & (y < num_classes)).all()
    assert torch.isfinite(x).all()


def rewrite_csv(path: Path, drop: str | None = None, edit=None) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c != drop]
    if edit:
        rows = [edit(dict(r)) for r in rows]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- ESC-50


def test_esc50_labels_and_default_split(esc50, tmp_path):
    dm = ESC50DataModule(str(esc50), cache_dir=str(tmp_path / "cache"))
    assert dm.labels == ["dog", "rooster", "rain"] and dm.num_classes == 3
    assert (dm.test_fold, dm.val_fold) == (1, 2)
    assert {esc_fold(p) for p, _ in dm.splits["test"]} == {1}
    assert {esc_fold(p) for p, _ in dm.splits["val"]} == {2}
    assert {esc_fold(p) for p, _ in dm.splits["train"]} == {3, 4, 5}
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    for p, y in dm.splits["train"]:  # label = the `target` at the end of the file name
        assert y == int(p.stem.split("-")[-1]) and p.is_file()
    assert dm.preprocessing["target_frames"] == 500 and dm.preprocessing["frontend"] == "fbank_ast"


@pytest.mark.parametrize("test_fold", [1, 2, 3, 4, 5])
def test_esc50_fold_rotation(esc50, tmp_path, test_fold):
    dm = ESC50DataModule(str(esc50), test_fold=test_fold, cache_dir=str(tmp_path / "cache"))
    val = test_fold % 5 + 1  # the next fold, 5 -> 1
    assert dm.val_fold == val
    folds = {s: {esc_fold(p) for p, _ in dm.splits[s]} for s in dm.splits}
    assert folds == {"test": {test_fold}, "val": {val}, "train": set(range(1, 6)) - {test_fold, val}}
    # every clip in exactly one split
    everything = [p for s in dm.splits.values() for p, _ in s]
    assert len(everything) == len(set(everything)) == 30


def test_esc50_explicit_val_fold(esc50, tmp_path):
    dm = ESC50DataModule(str(esc50), test_fold=2, val_fold=5, cache_dir=str(tmp_path / "cache"))
    assert {esc_fold(p) for p, _ in dm.splits["val"]} == {5}
    assert {esc_fold(p) for p, _ in dm.splits["train"]} == {1, 3, 4}


@pytest.mark.parametrize("kw,field", [({"test_fold": 6}, "test_fold"), ({"test_fold": 0}, "test_fold"),
                                      ({"test_fold": 1, "val_fold": 7}, "val_fold"),
                                      ({"test_fold": 3, "val_fold": 3}, "val_fold")])
def test_esc50_bad_folds(esc50, kw, field):
    with pytest.raises(DatasetLayoutError, match=field):
        ESC50DataModule(str(esc50), **kw)


def test_esc50_batches_specaugment_on_train_only(esc50, tmp_path):
    cache = tmp_path / "cache"
    dm = ESC50DataModule(str(esc50), batch_size=4, cache_dir=str(cache))
    assert isinstance(dm.augment, SpecAugment)
    assert (dm.augment.freq.mask_param, dm.augment.time.mask_param) == (24, 80)
    check_batch(first_batch(dm, "train"), 500, 3, 4)
    check_batch(first_batch(dm, "val"), 500, 3, 4)
    assert dm.train_dataloader().dataset.augment is dm.augment
    assert dm.val_dataloader().dataset.augment is None and dm.test_dataloader().dataset.augment is None
    assert list(cache.glob("*.npy")), "features were not cached under cache_dir"
    cfg = FbankConfig(target_frames=500)
    # val / test items are the clean features
    ds = dm.val_dataloader().dataset
    for i in range(len(ds)):
        x, y = ds[i]
        assert torch.equal(x, features(ds.items[i][0], cfg)) and y == ds.items[i][1]
    # train items are masked copies of them: some differ, and only where whole rows / columns are 0
    ds = dm.train_dataloader().dataset
    changed = 0
    for i in range(len(ds)):
        x, _ = ds[i]
        clean = features(ds.items[i][0], cfg)
        diff = x != clean
        assert (x[diff] == 0).all()
        changed += bool(diff.any())
    assert changed >= len(ds) // 2


def test_esc50_specaugment_switch(esc50, tmp_path):
    dm = ESC50DataModule(str(esc50), specaugment=False, cache_dir=str(tmp_path / "cache"))
    assert dm.augment is None
    dm.setup("fit")
    assert dm.train_dataloader().dataset.augment is None


def test_esc50_small_target_frames(esc50, tmp_path):
    dm = ESC50DataModule(str(esc50), batch_size=3, target_frames=64, cache_dir=str(tmp_path / "cache"))
    check_batch(first_batch(dm, "test"), 64, 3, 3)


def test_esc50_few_shot_is_seeded_and_deterministic(esc50, tmp_path):
    def train(seed, k=2):
        dm = ESC50DataModule(str(esc50), few_shot=k, seed=seed, cache_dir=str(tmp_path / "cache"))
        return dm, sorted((str(p), y) for p, y in dm.splits["train"])

    dm, a = train(0)
    assert len(a) == 6 and sorted(y for _, y in a) == [0, 0, 1, 1, 2, 2]
    assert {esc_fold(Path(p)) for p, _ in a} <= {3, 4, 5}  # drawn from the train folds only
    assert len(dm.splits["val"]) == 6 and len(dm.splits["test"]) == 6  # evaluation untouched
    assert train(0)[1] == a
    assert any(train(s)[1] != a for s in range(1, 6))
    assert len(train(0, k=1)[1]) == 3
    with pytest.raises(ValueError, match="fewer than k=7"):
        train(0, k=7)  # 6 train clips per class


def test_esc50_missing_metadata(esc50):
    (esc50 / "meta" / "esc50.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"esc50\.csv.*not found"):
        ESC50DataModule(str(esc50))


def test_esc50_metadata_missing_a_column(tmp_path, afx):
    root = afx.make_esc50(tmp_path / "esc", columns=[c for c in afx.ESC50_COLUMNS if c != "target"])
    with pytest.raises(DatasetLayoutError, match=r"esc50\.csv.*target"):
        ESC50DataModule(str(root))


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(DatasetLayoutError, match="not found"):
        ESC50DataModule(str(tmp_path / "nowhere"))


def corrupt_one(dm, afx, split="train"):
    path = dm.splits[split][0][0]
    afx.corrupt(path)
    return path


def test_corrupt_wav_raises_naming_the_file(esc50, tmp_path, afx):
    dm = ESC50DataModule(str(esc50), batch_size=64, target_frames=64, cache_dir=str(tmp_path / "cache"))
    bad = corrupt_one(dm, afx)
    dm.setup("fit")
    with pytest.raises(AudioError) as e:
        next(iter(dm.train_dataloader()))
    assert str(bad) in str(e.value)


def test_skip_bad_files(esc50, tmp_path, afx):
    dm = ESC50DataModule(str(esc50), batch_size=64, target_frames=64, skip_bad_files=True,
                         cache_dir=str(tmp_path / "cache"))
    bad = corrupt_one(dm, afx, "val")
    dm.setup("fit")
    assert dm.skipped == {"train": 0, "val": 1, "test": 0}
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (5, 64, 128)
    assert bad not in [p for p, _ in dm.splits["val"]]
    assert len(dm.splits["train"]) == 18


def test_skipped_count_survives_a_second_setup(esc50, tmp_path, afx):
    """Regression (AudioDataModule.setup): Lightning calls `setup` again for every
    entry point (`trainer.fit` then `trainer.test` in shared.cli.run). The second call re-filters
    the already-filtered splits and overwrites `self.skipped` with zeros, so the count of skipped
    files is lost by the time the run reports."""
    dm = ESC50DataModule(str(esc50), target_frames=64, skip_bad_files=True, cache_dir=str(tmp_path / "cache"))
    corrupt_one(dm, afx, "test")
    dm.setup("fit")
    dm.setup("test")
    assert dm.skipped["test"] == 1


def test_clip_listed_but_missing_on_disk(esc50, tmp_path):
    """Regression (FbankCache._file ran `path.stat()` first): a clip listed in the
    metadata but absent on disk raises FileNotFoundError instead of AudioError, so
    `skip_bad_files=True` crashes in setup instead of skipping it."""
    dm = ESC50DataModule(str(esc50), target_frames=64, skip_bad_files=True, cache_dir=str(tmp_path / "cache"))
    gone = dm.splits["train"][0][0]
    gone.unlink()
    dm.setup("fit")
    assert dm.skipped["train"] == 1


# --------------------------------------------------------------------------- UrbanSound8K


def us8k_fold(path: Path) -> int:
    return int(Path(path).parent.name.removeprefix("fold"))


def test_us8k_labels_and_splits(us8k, tmp_path, afx):
    dm = UrbanSound8KDataModule(str(us8k), cache_dir=str(tmp_path / "cache"))
    assert dm.labels == afx.US8K_CLASSES and dm.num_classes == 3
    assert (dm.test_fold, dm.val_fold) == (1, 2)
    folds = {s: {us8k_fold(p) for p, _ in dm.splits[s]} for s in dm.splits}
    assert folds == {"test": {1}, "val": {2}, "train": set(range(3, 11))}
    for p, y in dm.splits["train"]:  # classID is the second field of the file name
        assert y == int(p.stem.split("-")[1]) and p.is_file()
    assert dm.preprocessing["target_frames"] == 400


@pytest.mark.parametrize("test_fold", range(1, 11))
def test_us8k_validation_fold_is_never_the_test_fold(us8k, tmp_path, test_fold):
    dm = UrbanSound8KDataModule(str(us8k), test_fold=test_fold, cache_dir=str(tmp_path / "cache"))
    assert dm.val_fold == test_fold % 10 + 1 != test_fold
    test = {us8k_fold(p) for p, _ in dm.splits["test"]}
    val = {us8k_fold(p) for p, _ in dm.splits["val"]}
    assert test == {test_fold} and val == {dm.val_fold} and not test & val
    assert not rel(us8k, dm.splits["train"]) & rel(us8k, dm.splits["test"])


@pytest.mark.parametrize("kw,field", [({"test_fold": 11}, "test_fold"), ({"test_fold": 4, "val_fold": 4}, "val_fold")])
def test_us8k_bad_folds(us8k, kw, field):
    with pytest.raises(DatasetLayoutError, match=field):
        UrbanSound8KDataModule(str(us8k), **kw)


def test_us8k_mixed_formats_decode_to_batches(us8k, tmp_path):
    import soundfile as sf

    dm = UrbanSound8KDataModule(str(us8k), batch_size=8, cache_dir=str(tmp_path / "cache"))
    formats = {(sf.info(str(p)).samplerate, sf.info(str(p)).channels, sf.info(str(p)).subtype)
               for s in dm.splits.values() for p, _ in s}
    assert len(formats) >= 6  # the fixture really mixes rates / channels / bit depths
    check_batch(first_batch(dm, "train"), 400, 3, 8)
    assert dm.train_dataloader().dataset.augment is not None
    assert dm.val_dataloader().dataset.augment is None
    for split in ("train", "val", "test"):  # every clip of every format decodes
        loader = getattr(dm, f"{split}_dataloader")()
        n = sum(len(y) for _, y in loader)
        assert n == len(dm.splits[split])


def test_us8k_metadata_errors(us8k):
    meta = us8k / "metadata" / "UrbanSound8K.csv"
    rewrite_csv(meta, drop="classID")
    with pytest.raises(DatasetLayoutError, match=r"UrbanSound8K\.csv.*classID"):
        UrbanSound8KDataModule(str(us8k))
    meta.unlink()
    with pytest.raises(DatasetLayoutError, match=r"UrbanSound8K\.csv.*not found"):
        UrbanSound8KDataModule(str(us8k))


def test_us8k_few_shot(us8k, tmp_path):
    dm = UrbanSound8KDataModule(str(us8k), few_shot=3, seed=1, cache_dir=str(tmp_path / "cache"))
    ys = sorted(y for _, y in dm.splits["train"])
    assert ys == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = UrbanSound8KDataModule(str(us8k), few_shot=3, seed=1, cache_dir=str(tmp_path / "cache"))
    assert again.splits["train"] == dm.splits["train"]


def test_us8k_corrupt_file_named_and_skipped(us8k, tmp_path, afx):
    dm = UrbanSound8KDataModule(str(us8k), batch_size=64, target_frames=32, cache_dir=str(tmp_path / "cache"))
    bad = corrupt_one(dm, afx, "test")
    dm.setup("test")
    with pytest.raises(AudioError) as e:
        list(dm.test_dataloader())
    assert str(bad) in str(e.value)
    dm = UrbanSound8KDataModule(str(us8k), batch_size=64, target_frames=32, skip_bad_files=True,
                                cache_dir=str(tmp_path / "cache"))
    dm.setup("test")
    assert dm.skipped["test"] == 1
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (2, 32, 128)


# --------------------------------------------------------------------------- Speech Commands v2


def test_gsc_labels_and_official_lists(gsc, tmp_path, afx):
    root, split = gsc
    dm = SpeechCommandsDataModule(str(root), cache_dir=str(tmp_path / "cache"))
    assert dm.labels == afx.GSC_WORDS and dm.num_classes == 3
    assert "_background_noise_" not in dm.labels
    for s in ("train", "val", "test"):
        assert rel(root, dm.splits[s]) == set(split[s])
        for p, y in dm.splits[s]:
            assert dm.labels[y] == p.parent.name
    every = [p for s in dm.splits.values() for p, _ in s]
    assert not any("_background_noise_" in str(p) for p in every)
    assert len(every) == 15
    assert dm.augment is None  # no SpecAugment for Speech Commands (as PETL-AST)
    assert dm.preprocessing["target_frames"] == 100


def test_gsc_batches(gsc, tmp_path):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), batch_size=9, cache_dir=str(tmp_path / "cache"))
    check_batch(first_batch(dm, "train"), 100, 3, 9)
    assert dm.train_dataloader().dataset.augment is None
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 100, 128) and sorted(y.tolist()) == [0, 1, 2]


def test_gsc_specaugment_can_be_enabled(gsc, tmp_path):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), specaugment=True, freq_mask=10, time_mask=20,
                                  cache_dir=str(tmp_path / "cache"))
    assert isinstance(dm.augment, SpecAugment) and dm.augment.time.mask_param == 20


def test_gsc_few_shot(gsc, tmp_path):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), few_shot=2, seed=3, cache_dir=str(tmp_path / "cache"))
    assert sorted(y for _, y in dm.splits["train"]) == [0, 0, 1, 1, 2, 2]
    assert len(dm.splits["val"]) == len(dm.splits["test"]) == 3
    dm2 = SpeechCommandsDataModule(str(root), few_shot=2, seed=3, cache_dir=str(tmp_path / "cache"))
    assert dm2.splits == dm.splits


@pytest.mark.parametrize("name", ["validation_list.txt", "testing_list.txt"])
def test_gsc_missing_list(gsc, name):
    root, _ = gsc
    (root / name).unlink()
    with pytest.raises(DatasetLayoutError, match=name):
        SpeechCommandsDataModule(str(root))


def test_gsc_list_names_a_missing_file(gsc):
    root, _ = gsc
    with open(root / "testing_list.txt", "a") as f:
        f.write("yes/deadbeef_nohash_9.wav\n")
    with pytest.raises(DatasetLayoutError, match="yes/deadbeef_nohash_9.wav"):
        SpeechCommandsDataModule(str(root))


def test_gsc_corrupt_file(gsc, tmp_path, afx):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), batch_size=64, cache_dir=str(tmp_path / "cache"))
    bad = corrupt_one(dm, afx, "train")
    dm.setup("fit")
    with pytest.raises(AudioError) as e:
        next(iter(dm.train_dataloader()))
    assert str(bad) in str(e.value)


# --------------------------------------------------------------------------- Fluent Speech Commands


def test_fsc_intents_and_splits(fsc, tmp_path, afx):
    root, split = fsc
    dm = FluentSpeechCommandsDataModule(str(root), cache_dir=str(tmp_path / "cache"))
    intents = sorted(f"{a}|{o}|{loc}" for a, o, loc, _ in afx.FSC_INTENTS)
    assert dm.labels == intents and dm.num_classes == 3
    assert "change language|Chinese|none" in dm.labels
    for s in ("train", "val", "test"):
        got = sorted((str(p.relative_to(root)), dm.labels[y]) for p, y in dm.splits[s])
        assert got == sorted(split[s])
        assert all(p.is_file() for p, _ in dm.splits[s])
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert dm.augment is None and dm.preprocessing["target_frames"] == 400


def test_fsc_batches(fsc, tmp_path):
    root, _ = fsc
    dm = FluentSpeechCommandsDataModule(str(root), batch_size=6, cache_dir=str(tmp_path / "cache"))
    check_batch(first_batch(dm, "train"), 400, 3, 6)
    dm = FluentSpeechCommandsDataModule(str(root), batch_size=3, target_frames=48,
                                        cache_dir=str(tmp_path / "cache"))
    check_batch(first_batch(dm, "test"), 48, 3, 3)


def test_fsc_few_shot(fsc, tmp_path):
    root, _ = fsc
    dm = FluentSpeechCommandsDataModule(str(root), few_shot=1, seed=0, cache_dir=str(tmp_path / "cache"))
    assert sorted(y for _, y in dm.splits["train"]) == [0, 1, 2]


@pytest.mark.parametrize("fname,col", [("valid_data.csv", "location"), ("train_data.csv", "action"),
                                       ("test_data.csv", "path")])
def test_fsc_csv_missing_a_column(fsc, fname, col):
    root, _ = fsc
    rewrite_csv(root / "data" / fname, drop=col)
    with pytest.raises(DatasetLayoutError, match=rf"{fname}.*{col}"):
        FluentSpeechCommandsDataModule(str(root))


def test_fsc_missing_csv(fsc):
    root, _ = fsc
    (root / "data" / "test_data.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"test_data\.csv.*not found"):
        FluentSpeechCommandsDataModule(str(root))


def test_fsc_intent_absent_from_train(fsc):
    root, _ = fsc

    def edit(r):
        if r["action"] == "decrease":
            r["action"] = "increase"
        return r

    rewrite_csv(root / "data" / "test_data.csv", edit=edit)
    with pytest.raises(DatasetLayoutError, match="increase"):
        FluentSpeechCommandsDataModule(str(root))


def test_fsc_corrupt_file_skipped(fsc, tmp_path, afx):
    root, _ = fsc
    dm = FluentSpeechCommandsDataModule(str(root), batch_size=8, target_frames=32, skip_bad_files=True,
                                        cache_dir=str(tmp_path / "cache"))
    bad = corrupt_one(dm, afx, "train")
    dm.setup("fit")
    assert dm.skipped == {"train": 1, "val": 0, "test": 0}
    assert bad not in [p for p, _ in dm.splits["train"]]
    assert sum(len(y) for _, y in dm.train_dataloader()) == 5
