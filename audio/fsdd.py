"""The Free Spoken Digit Dataset arranged in the Speech Commands v2 layout (real speech, offline).

FSDD (CC BY-SA 4.0, Jakobovski et al.) ships as `recordings/{digit}_{speaker}_{take}.wav`
(8 kHz mono). `write_speech_commands_layout` links a subset into word folders (`zero` ... `nine`)
with `validation_list.txt` / `testing_list.txt`, so `SpeechCommandsDataModule` reads it as is:
takes 0-4 are FSDD's official test split; takes 5-9 validate; the rest train.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


def write_speech_commands_layout(fsdd: str | os.PathLike, root: str | os.PathLike,
                                 speakers: list[str] | None = None, max_take: int = 50) -> Path:
    """Link FSDD recordings into `root` (idempotent). Returns `root`."""
    src, root = Path(fsdd) / "recordings", Path(root)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: FSDD recordings folder not found")
    if (root / "testing_list.txt").is_file():
        return root
    lists = {"val": [], "test": []}
    for wav in sorted(src.glob("*.wav")):
        m = NAME.match(wav.name)
        if not m:
            continue
        digit, speaker, take = int(m[1]), m[2], int(m[3])
        if (speakers and speaker not in speakers) or take >= max_take:
            continue
        word = WORDS[digit]
        (root / word).mkdir(parents=True, exist_ok=True)
        dst = root / word / wav.name
        if not dst.exists():
            os.symlink(wav.resolve(), dst)
        if take < 5:
            lists["test"].append(f"{word}/{wav.name}")
        elif take < 10:
            lists["val"].append(f"{word}/{wav.name}")
    (root / "validation_list.txt").write_text("\n".join(lists["val"]) + "\n")
    (root / "testing_list.txt").write_text("\n".join(lists["test"]) + "\n")  # written last: marks completion
    return root
