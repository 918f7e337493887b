"""Real-audio tier: FSDD digits as species, soundscapes mixed from held-out speakers (skips without the data)."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

RECORDINGS = SHARED_DATA / "fsdd" / "recordings"


@pytest.mark.real
@pytest.mark.skipif(not RECORDINGS.is_dir(), reason=f"{RECORDINGS} is absent")
def test_fsdd_soundscapes_hold_out_speakers(tmp_path):
    from audio.birds.synthetic import FSDDSoundscapesDataModule

    dm = FSDDSoundscapesDataModule(recordings=str(RECORDINGS), root=str(tmp_path / "mix"), soundscapes=3, few_shot=2)
    dm.setup()
    assert dm.labels == [str(d) for d in range(10)]
    train = dm.splits["train"].items
    assert len(train) == 20 and not any(s in it.path for it in train for s in ("_theo_", "_nicolas_"))
    test = dm.splits["test"]
    assert len(test) == 6  # 3 soundscapes of 10 s, two 5 s windows each
    assert sum(len(it.labels) for it in test.items) >= 3  # 2-3 digits per soundscape land in its windows
    x, y = test[0]
    assert x.shape == (1, 512, 128) and y.shape == (10,)
