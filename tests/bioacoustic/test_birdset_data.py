"""BirdSet data: csv and save_to_disk layouts, window labels, few-shot, bad inputs, demo folder safety."""
import numpy as np
import pytest
import soundfile as sf

from audio.birds.synthetic import SyntheticBirdsDataModule, window_labels, write_synthetic_birds
from audio.birds.birdset import TASKS, BirdSetDataModule


def test_window_labels_need_a_tenth_of_a_second_inside():
    events = [(0, 4.0, 5.05), (1, 4.95, 6.0), (2, 9.0, 9.05)]
    assert window_labels(events, [(0, 5), (5, 10)]) == [[0], [1]]


def test_eight_test_sets_and_their_class_counts():
    assert TASKS == {"HSN": 21, "NBP": 51, "NES": 89, "PER": 132, "POW": 48, "SNE": 56, "SSW": 81, "UHH": 27}


@pytest.fixture(scope="module")
def birds(tmp_path_factory):
    return write_synthetic_birds(tmp_path_factory.mktemp("birds"), num_species=3, focal_per_species=3,
                                 soundscapes=2, seed=1)


def test_csv_layout(birds):
    dm = BirdSetDataModule(str(birds))
    dm.setup()
    assert dm.labels == ["upchirp", "downchirp", "trill"] and dm.num_classes == 3
    assert len(dm.splits["train"]) == 9 and len(dm.splits["test"]) == 6  # 2 soundscapes x 3 windows
    x, y = dm.splits["train"][4]
    assert x.shape == (1, 512, 128) and y.tolist() == [0.0, 1.0, 0.0]
    rows = (birds / "test.csv").read_text().splitlines()[1:]
    for i, row in enumerate(rows):
        codes = [c for c in row.split(",")[3].split(";") if c]
        assert dm.splits["test"].target(i).nonzero().flatten().tolist() == sorted(dm.labels.index(c) for c in codes)


def test_few_shot_keeps_k_per_class(birds):
    dm = BirdSetDataModule(str(birds), few_shot=1, seed=0)
    dm.setup()
    assert sorted(it.labels[0] for it in dm.splits["train"].items) == [0, 1, 2]


def test_unknown_code_and_wrong_task_name_the_file(birds, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(birds, root)
    text = (root / "test.csv").read_text().replace("filepath,start_time,end_time,ebird_code_multilabel\n",
                                                   "filepath,start_time,end_time,ebird_code_multilabel\nsoundscapes/soundscape_000.wav,0,5,grewoo\n")
    (root / "test.csv").write_text(text)
    with pytest.raises(ValueError, match=r"test.csv, line 2: unknown eBird code 'grewoo'"):
        BirdSetDataModule(str(root)).setup()
    with pytest.raises(ValueError, match="3 classes, but BirdSet HSN has 21"):
        BirdSetDataModule(str(birds), task="HSN").setup()
    with pytest.raises(FileNotFoundError, match="neither a save_to_disk"):
        BirdSetDataModule(str(tmp_path)).setup()


def test_hf_save_to_disk_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    sr = 32_000
    t = np.arange(7 * sr) / sr
    for name, f in (("a.wav", 2000), ("b.wav", 5000), ("scape.wav", 3000)):
        sf.write(tmp_path / name, (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr)
    names = ["amerob", "norcar"]
    train = Dataset.from_dict(
        {"filepath": [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")], "ebird_code": [1, 0],
         "detected_events": [[[5.0, 6.0]], []], "start_time": [None, None], "end_time": [None, None]},
        features=Features({"filepath": Value("string"), "ebird_code": ClassLabel(names=names),
                           "detected_events": Sequence(Sequence(Value("float32"))),
                           "start_time": Value("float32"), "end_time": Value("float32")}))
    test = Dataset.from_dict(
        {"filepath": ["scape.wav", "scape.wav"], "start_time": [0.0, 2.0], "end_time": [5.0, 7.0],
         "ebird_code_multilabel": [[0, 1], []]},
        features=Features({"filepath": Value("string"), "start_time": Value("float32"), "end_time": Value("float32"),
                           "ebird_code_multilabel": Sequence(ClassLabel(names=names))}))
    DatasetDict({"train": train, "test_5s": test}).save_to_disk(str(tmp_path / "ds"))
    dm = BirdSetDataModule(str(tmp_path / "ds"))
    dm.setup()
    assert dm.resolved_layout() == "hf" and dm.labels == names
    assert [it.labels for it in dm.splits["train"].items] == [(1,), (0,)]
    assert dm.splits["train"].items[0].events == ((5.0, 6.0),)
    assert dm.splits["test"].items[0].path == str(tmp_path / "ds" / "scape.wav")  # relative: under the root
    assert dm.splits["test"].target(0).tolist() == [1.0, 1.0] and dm.splits["test"].target(1).tolist() == [0.0, 0.0]
    # test windows resolve relative to the dataset folder: copy the soundscape there
    import shutil

    shutil.copy(tmp_path / "scape.wav", tmp_path / "ds" / "scape.wav")
    x, _ = dm.splits["test"][1]
    assert x.shape == (1, 512, 128)


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "my_recordings.wav").write_bytes(b"precious")
    with pytest.raises(ValueError, match="holds files the demo did not write"):
        SyntheticBirdsDataModule(root=str(tmp_path)).setup()
    assert (tmp_path / "my_recordings.wav").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_recordings.wav"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_recipes_parse_and_name_their_test_set(task):
    from pathlib import Path

    import yaml

    from audio.birds.probe import parser

    recipe = Path(__file__).resolve().parents[2] / "domains" / "bioacoustic" / f"{task.lower()}.yaml"
    cfg = parser().parse_args(["--config", str(recipe)])
    assert cfg.data.init_args.task == task and cfg.backbone == "bird-mae"
    raw = yaml.safe_load(recipe.read_text())
    assert (raw["epochs"], raw["batch_size"]) == (30, 128)


def test_val_fraction_holds_out_focal_recordings(birds):
    dm = BirdSetDataModule(str(birds), val_fraction=0.34, seed=0)
    assert dm.num_classes == 3  # known before setup: audio.train links it into the model
    dm.setup()
    train, val = {it.path for it in dm.splits["train"].items}, {it.path for it in dm.splits["val"].items}
    assert (len(train), len(val)) == (6, 3) and not train & val  # round(0.34 * 9) = 3
    with pytest.raises(ValueError, match="val_fraction"):
        no_val = BirdSetDataModule(str(birds))
        no_val.setup()
        no_val.val_dataloader()
