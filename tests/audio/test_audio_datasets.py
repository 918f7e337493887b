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
    assert (dm.test_fold, dm.val_fold, dm.protocol) == (1, 5, "petl-ast")  # PETL-AST: test 1, valid 5
    assert {esc_fold(p) for p, _ in dm.splits["test"]} == {1}
    assert {esc_fold(p) for p, _ in dm.splits["val"]} == {5}
    assert {esc_fold(p) for p, _ in dm.splits["train"]} == {2, 3, 4}
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    for p, y in dm.splits["train"]:  # label = the `target` at the end of the file name
        assert y == int(p.stem.split("-")[-1]) and p.is_file()
    assert dm.preprocessing["target_frames"] == 500 and dm.preprocessing["frontend"] == "fbank_ast"


@pytest.mark.parametrize("test_fold", [1, 2, 3, 4, 5])
def test_esc50_fold_rotation(esc50, tmp_path, test_fold):
    dm = ESC50DataModule(str(esc50), test_fold=test_fold, cache_dir=str(tmp_path / "cache"))
    val = {1: 5, 2: 1, 3: 2, 4: 3, 5: 4}[test_fold]  # PETL-AST main.py: folds_valid / folds_test
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
    assert {esc_fold(Path(p)) for p, _ in a} <= {2, 3, 4}  # drawn from the train folds only
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
    assert (dm.test_fold, dm.val_fold) == (1, 10)
    folds = {s: {us8k_fold(p) for p, _ in dm.splits[s]} for s in dm.splits}
    assert folds == {"test": {1}, "val": {10}, "train": set(range(2, 10))}
    for p, y in dm.splits["train"]:  # classID is the second field of the file name
        assert y == int(p.stem.split("-")[1]) and p.is_file()
    assert dm.preprocessing["target_frames"] == 400


@pytest.mark.parametrize("test_fold", range(1, 11))
def test_us8k_validation_fold_is_never_the_test_fold(us8k, tmp_path, test_fold):
    dm = UrbanSound8KDataModule(str(us8k), test_fold=test_fold, cache_dir=str(tmp_path / "cache"))
    assert dm.val_fold == (test_fold - 2) % 10 + 1 != test_fold  # the fold before
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
    assert dm.labels == afx.GSC_WORDS and dm.num_classes == 35
    assert "_background_noise_" not in dm.labels
    for s in ("train", "val", "test"):
        assert rel(root, dm.splits[s]) == set(split[s])
        for p, y in dm.splits[s]:
            assert dm.labels[y] == p.parent.name
    every = [p for s in dm.splits.values() for p, _ in s]
    assert not any("_background_noise_" in str(p) for p in every)
    assert len(every) == 175
    assert dm.augment is None  # PETL-AST main.py (since c80097e): apply_SpecAug=False for GSC
    assert dm.preprocessing["target_frames"] == 100


def test_gsc_batches(gsc, tmp_path):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), batch_size=9, cache_dir=str(tmp_path / "cache"))
    check_batch(first_batch(dm, "train"), 100, 35, 9)
    assert dm.train_dataloader().dataset.augment is None
    ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert sorted(ys.tolist()) == list(range(35))  # one validation clip per word


def test_gsc_specaugment_can_be_enabled(gsc, tmp_path):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), specaugment=True, freq_mask=10, time_mask=20,
                                  cache_dir=str(tmp_path / "cache"))
    assert isinstance(dm.augment, SpecAugment) and dm.augment.time.mask_param == 20


def test_gsc_few_shot(gsc, tmp_path):
    root, _ = gsc
    dm = SpeechCommandsDataModule(str(root), few_shot=2, seed=3, cache_dir=str(tmp_path / "cache"))
    assert sorted(y for _, y in dm.splits["train"]) == sorted(list(range(35)) * 2)
    assert len(dm.splits["val"]) == len(dm.splits["test"]) == 35
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


# --------------------------------------------------------------------------- protocols (issue 13)


def share_src_files(root: Path) -> None:
    """Real ESC-50: several clips (takes A, B, ...) cut from one freesound recording share `src_file`;
    here takes A+B share one, C+D another."""
    rewrite_csv(root / "meta" / "esc50.csv",
                edit=lambda r: {**r, "src_file": str(int(r["src_file"]) - "ABCDEFG".index(r["take"]) % 2)})


def test_esc50_official_protocol_trains_on_four_folds_and_validates_on_whole_recordings(esc50, tmp_path, afx):
    afx.make_esc50(esc50, per_fold=4)  # 4 takes of 2 recordings per class and fold
    share_src_files(esc50)
    dm = ESC50DataModule(str(esc50), test_fold=2, protocol="official", val_fraction=0.25,
                         cache_dir=str(tmp_path / "cache"))
    assert dm.protocol == "official" and dm.val_fold is None
    assert {esc_fold(p) for p, _ in dm.splits["test"]} == {2}
    assert {esc_fold(p) for p, _ in dm.splits["train"] + dm.splits["val"]} == {1, 3, 4, 5}
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == 4 * 3 * 4  # every training-fold clip
    src = {r["filename"]: r["src_file"] for r in csv.DictReader(open(esc50 / "meta" / "esc50.csv"))}
    groups = {s: {src[p.name] for p, _ in dm.splits[s]} for s in ("train", "val")}
    assert not groups["train"] & groups["val"]  # no recording in both
    assert len(groups["val"]) == round(0.25 * 24)  # 24 training recordings, a quarter held out
    assert len(dm.splits["val"]) == 2 * len(groups["val"])  # both takes of each held-out recording


def test_esc50_official_protocol_without_validation_tests_the_last_epoch(esc50, tmp_path):
    dm = ESC50DataModule(str(esc50), protocol="official", val_fraction=0, cache_dir=str(tmp_path / "cache"))
    assert dm.protocol == "official-last-epoch"
    assert dm.splits["val"] == [] and len(dm.splits["train"]) == 24
    dm.setup("fit")
    assert dm.val_dataloader() == []  # Lightning skips validation


def test_protocol_arguments_are_checked(esc50, us8k):
    with pytest.raises(ValueError, match="protocol must be one of"):
        ESC50DataModule(str(esc50), protocol="anchor")
    with pytest.raises(ValueError, match="val_fold is for protocol 'petl-ast'"):
        UrbanSound8KDataModule(str(us8k), protocol="official", val_fold=3)
    with pytest.raises(ValueError, match="val_fraction"):
        ESC50DataModule(str(esc50), protocol="official", val_fraction=1.0)


def test_us8k_official_protocol_trains_on_nine_folds_grouped_by_fsid(us8k, tmp_path):
    meta = us8k / "metadata" / "UrbanSound8K.csv"
    rewrite_csv(meta, edit=lambda r: {**r, "fsID": str(int(r["fold"]) * 100 + int(r["classID"]) % 2)})
    dm = UrbanSound8KDataModule(str(us8k), test_fold=4, protocol="official", val_fraction=0.2,
                                cache_dir=str(tmp_path / "cache"))
    folds = {us8k_fold(p) for p, _ in dm.splits["train"] + dm.splits["val"]}
    assert folds == set(range(1, 11)) - {4} and {us8k_fold(p) for p, _ in dm.splits["test"]} == {4}
    fsid = {r["slice_file_name"]: r["fsID"] for r in csv.DictReader(open(meta))}
    val, train = ({fsid[p.name] for p, _ in dm.splits[s]} for s in ("val", "train"))
    assert val and not val & train and len(val) == round(0.2 * 18)


def test_petl_ast_recipes_augment_like_the_anchor():
    """PETL-AST main.py (HEAD, and since commit c80097e "Fixed specaugmentation"): apply_SpecAug=True
    for ESC-50 and UrbanSound8K, False for GSC and FSC; our recipes say the same explicitly."""
    import yaml

    data = Path(__file__).resolve().parents[2] / "domains" / "audio" / "data"
    got = {n: yaml.safe_load((data / f"{n}.yaml").read_text())["data"]["init_args"]["specaugment"]
           for n in ("esc50", "us8k", "speech_commands", "fsc")}
    assert got == {"esc50": True, "us8k": True, "speech_commands": False, "fsc": False}
    recipe = {n: yaml.safe_load((data / f"{n}.yaml").read_text())["data"]["init_args"] for n in ("esc50", "us8k")}
    assert recipe["esc50"]["protocol"] == recipe["us8k"]["protocol"] == "petl-ast"


# --------------------------------------------------------------------------- smaller items (issue 13.6)


def test_gsc_version_checks_the_word_folders(gsc, tmp_path):
    import shutil

    root, _ = gsc
    assert SpeechCommandsDataModule(str(root), version="v2").num_classes == 35
    for w in ("backward", "follow", "forward", "learn", "visual"):  # what a v0.01 root lacks
        shutil.rmtree(root / w)
    with open(root / "validation_list.txt") as f:
        keep = [line for line in f if line.split("/")[0] not in ("backward", "follow", "forward", "learn", "visual")]
    (root / "validation_list.txt").write_text("".join(keep))
    with open(root / "testing_list.txt") as f:
        keep = [line for line in f if line.split("/")[0] not in ("backward", "follow", "forward", "learn", "visual")]
    (root / "testing_list.txt").write_text("".join(keep))
    with pytest.raises(DatasetLayoutError, match=r"30 word folders, Speech Commands v2 has 35: missing "
                                                 r"\['backward', 'follow', 'forward', 'learn', 'visual'\].*v0\.01"):
        SpeechCommandsDataModule(str(root), version="v2")
    assert SpeechCommandsDataModule(str(root), version="v0.01").num_classes == 30


def test_gsc_empty_word_folder_is_refused(gsc):
    root, _ = gsc
    for wav in (root / "wow").glob("*.wav"):
        wav.unlink()
    for name in ("validation_list.txt", "testing_list.txt"):
        lines = [ln for ln in (root / name).read_text().splitlines(keepends=True) if not ln.startswith("wow/")]
        (root / name).write_text("".join(lines))
    with pytest.raises(DatasetLayoutError, match=r"wow: word folder has no \.wav files"):
        SpeechCommandsDataModule(str(root))


def test_metadata_with_a_utf8_byte_order_mark(esc50, tmp_path):
    meta = esc50 / "meta" / "esc50.csv"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())  # as Excel saves CSV
    dm = ESC50DataModule(str(esc50), cache_dir=str(tmp_path / "cache"))
    assert dm.labels == ["dog", "rooster", "rain"] and len(dm.splits["test"]) == 6


def test_few_shot_is_drawn_after_bad_files_are_skipped(esc50, tmp_path, afx):
    # 6 training clips per class; k = 6 needs all of them, so one unusable clip must fail loudly
    # (drawn before skipping, the class would silently end with 5), and k = 5 keeps 5 usable ones.
    probe = ESC50DataModule(str(esc50), cache_dir=str(tmp_path / "cache"))
    bad = next(p for p, y in probe.splits["train"] if y == 1)
    afx.corrupt(bad)
    dm = ESC50DataModule(str(esc50), few_shot=5, skip_bad_files=True, target_frames=32,
                         cache_dir=str(tmp_path / "cache"))
    assert len(dm.splits["train"]) == 18  # nothing drawn before the files are checked
    dm.setup("fit")
    assert dm.skipped["train"] == 1
    assert sorted(y for _, y in dm.splits["train"]) == [0] * 5 + [1] * 5 + [2] * 5
    assert bad not in [p for p, _ in dm.splits["train"]]
    dm = ESC50DataModule(str(esc50), few_shot=6, skip_bad_files=True, target_frames=32,
                         cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="class 'rooster' has 5 samples, fewer than k=6"):
        dm.setup("fit")


def test_balanced_sampler_draws_classes_equally(esc50, tmp_path):
    keep = lambda r: r if r["target"] != "1" or r["fold"] in ("1", "2") else None  # noqa: E731
    with open(esc50 / "meta" / "esc50.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if keep(r)]
    with open(esc50 / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    dm = ESC50DataModule(str(esc50), test_fold=1, val_fold=5, balanced_sampler=True, target_frames=16,
                         batch_size=6, seed=0, cache_dir=str(tmp_path / "cache"))
    ys = [y for _, y in dm.splits["train"]]
    assert ys.count(1) == 2 and ys.count(0) == ys.count(2) == 6  # "rooster" is rare in training
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    drawn = torch.tensor([ys[i] for _ in range(300) for i in sampler])
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03)  # unbalanced: 2/14 for rooster
