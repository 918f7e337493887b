"""Real speech: FSDD (../shared/data/fsdd) in the Speech Commands layout. Skips cleanly when absent."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from audio.datasets import SpeechCommandsDataModule
from audio.fsdd import WORDS, write_speech_commands_layout

FSDD = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fsdd"
pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not (FSDD / "recordings").is_dir(), reason="../shared/data/fsdd is not present")]


@pytest.fixture(scope="module")
def gsc(tmp_path_factory):
    return write_speech_commands_layout(FSDD, tmp_path_factory.mktemp("fsdd") / "gsc", speakers=["george"], max_take=12,
                                        split="take")


def test_fsdd_reads_as_speech_commands(gsc, tmp_path):
    dm = SpeechCommandsDataModule(str(gsc), batch_size=8, cache_dir=str(tmp_path / "cache"))
    assert dm.labels == sorted(WORDS) and dm.num_classes == 10
    sizes = {s: len(v) for s, v in dm.splits.items()}
    assert sizes == {"train": 20, "val": 50, "test": 50}  # takes 10-11 / 5-9 / 0-4, one speaker
    assert all("_george_" in p.name and int(p.stem.split("_")[2]) < 5 for p, _ in dm.splits["test"])
    dm.setup("fit")
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 100, 128) and x.dtype == torch.float32
    # real speech: the 1 s digits are shorter than 100 frames, so the tail is padding (zeros before
    # normalisation), while the speech frames carry energy well above it
    pad = (0 + 4.2677393) / (2 * 4.5689974)
    assert torch.isclose(x[:, -1], torch.full_like(x[:, -1], pad)).float().mean() > 0.5
    assert (x[:, :20].amax(dim=(1, 2)) > pad + 0.1).all()
    words = [dm.labels[i] for i in y.tolist()]
    assert words == [WORDS[int(p.name[0])] for p, _ in dm.splits["test"][:8]]


@pytest.mark.slow
def test_fsdd_adapter_learns_real_digits(tmp_path):
    """`python -m pytest -m slow`: a small random AST fine-tuned on FSDD learns the spoken digits above chance."""
    from audio.train import main

    root = write_speech_commands_layout(FSDD, tmp_path / "gsc", speakers=["george", "jackson", "lucas"], max_take=30,
                                        split="take")
    row = main(["--config", "domains/audio/data/speech_commands.yaml", "--config", "domains/audio/methods/full.yaml",
                "--data.root", str(root), "--model.backbone", "tiny-ast",
                "--model.backbone_kwargs", "{max_length: 100, num_mel_bins: 128, hidden_size: 64, layers: 3, heads: 4}",
                "--data.num_workers", "0", "--data.batch_size", "32", "--data.cache_dir", str(tmp_path / "cache"),
                "--model.lr", "1e-3", "--trainer.max_epochs", "15", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--output_dir", str(tmp_path / "run")])
    assert row["test/acc"] > 0.3  # chance is 0.1


def test_fsdd_recipe_split_is_speaker_disjoint_on_the_real_data(tmp_path):
    """domains/audio/data/fsdd.yaml's datamodule on the real release: theo tests, nicolas validates."""
    from audio.fsdd import FSDDDataModule

    dm = FSDDDataModule(str(FSDD), cache_dir=str(tmp_path / "cache"))
    speakers = {s: {p.name.split("_")[1] for p, _ in items} for s, items in dm.splits.items()}
    assert speakers["test"] == {"theo"} and speakers["val"] == {"nicolas"}
    assert not speakers["train"] & (speakers["test"] | speakers["val"]) and len(speakers["train"]) == 4
    assert {s: len(v) for s, v in dm.splits.items()} == {"train": 2000, "val": 500, "test": 500}
    take = FSDDDataModule(str(FSDD), split="take", cache_dir=str(tmp_path / "cache"))
    assert {s: len(v) for s, v in take.splits.items()} == {"train": 2400, "val": 300, "test": 300}
