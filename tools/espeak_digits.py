"""Spoken digits from voices outside FSDD: espeak-ng (and flite, when installed) speaks "zero" ...
"nine" in several voices, speeds and pitches, and an audio adapter (default: the catalogue's
`fsdd-whisper-tiny-digits`) labels each clip with `audio.predict`. Prints one row per voice
(correct / 10) and the total.

    apt-get install -y espeak-ng flite
    python tools/espeak_digits.py                                   # the default voice set
    python tools/espeak_digits.py --adapter runs/x/adapter --voices en-us:160:50 en-gb-x-rp+f3:140:70 flite/slt
    python tools/espeak_digits.py --keep /tmp/espeak_digits --json out.json
    python tools/espeak_digits.py --pad 1.0 --snr 20 --gain-db -30   # as a quiet, noisy recording with silence around

A voice is `VOICE[:SPEED[:PITCH]]` (espeak-ng -v VOICE -s SPEED -p PITCH; defaults 160 words per
minute, pitch 50; formant synthesis, 22,050 Hz) or `flite/NAME` (flite's voices kal, kal16, awb,
rms, slt: diphone and statistical-parametric voices built from recordings of real speakers,
16 kHz / 8 kHz). The clips are the synthesisers' own WAV files, predicted as any user's file would
be (the bundle's preprocessing: resampling, band limit, trim).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# male / female variants (+m3, +f3, +f4 ...), accents, slow to fast, low to high pitch
VOICES = ["en-us:160:50", "en:160:50", "en-gb-x-rp:150:50", "en-us+m3:140:40", "en-us+f3:160:60",
          "en+f4:180:70", "en-gb-x-rp+f2:130:65", "en-us:120:30", "en-us+m1:200:50", "en-gb-scotland:170:55"]
FLITE_VOICES = ["flite/slt", "flite/awb", "flite/rms", "flite/kal16"]  # added when flite is installed
ADAPTER = "fsdd-whisper-tiny-digits"


def espeak() -> str | None:
    return shutil.which("espeak-ng")


def parse_voice(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    try:
        return parts[0], int(parts[1]) if len(parts) > 1 else 160, int(parts[2]) if len(parts) > 2 else 50
    except ValueError:
        raise SystemExit(f"error: voice {spec!r}: expected VOICE[:SPEED[:PITCH]] with integer speed and pitch") from None


def synthesise(spec: str, out: Path, exe: str | None = None) -> list[Path]:
    """The ten digit words in one voice spec, one WAV each (`<voice>_<speed>_<pitch>_<word>.wav`)."""
    if spec.startswith("flite/"):
        return _flite(spec.split("/", 1)[1], out)
    exe = exe or espeak()
    if exe is None:
        raise SystemExit("error: espeak-ng not found; install it (Debian / Ubuntu: apt-get install -y espeak-ng)")
    voice, speed, pitch = parse_voice(spec)
    files = []
    for word in WORDS:
        f = out / f"{voice.replace('+', '_')}_{speed}_{pitch}_{word}.wav"
        r = subprocess.run([exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(f), word],
                           capture_output=True, text=True)
        if r.returncode or not f.is_file():
            raise SystemExit(f"error: espeak-ng -v {voice} failed: {r.stderr.strip() or r.returncode}")
        files.append(f)
    return files


def _flite(voice: str, out: Path) -> list[Path]:
    exe = shutil.which("flite")
    if exe is None:
        raise SystemExit("error: flite not found; install it (Debian / Ubuntu: apt-get install -y flite)")
    files = []
    for word in WORDS:
        f = out / f"flite_{voice}_{word}.wav"
        r = subprocess.run([exe, "-voice", voice, "-t", word, "-o", str(f)], capture_output=True, text=True)
        if r.returncode or not f.is_file():
            raise SystemExit(f"error: flite -voice {voice} failed: {r.stderr.strip() or r.returncode}")
        files.append(f)
    return files


def degrade(f: Path, pad: float, snr: float | None, gain_db: float, seed: int) -> None:
    """Rewrite `f` as a worse recording: `pad` seconds of silence before and after, `gain_db` of
    gain, white noise over all of it at `snr` dB below the speech's RMS (None: no noise)."""
    import numpy as np
    import soundfile as sf

    x, sr = sf.read(str(f), dtype="float32")
    rms = float(np.sqrt(np.mean(x ** 2)))
    n = int(round(pad * sr))
    y = np.concatenate([np.zeros(n, np.float32), x, np.zeros(n, np.float32)])
    if snr is not None:
        y = y + np.random.default_rng(seed).standard_normal(y.size).astype(np.float32) * rms / 10 ** (snr / 20)
    sf.write(str(f), np.clip(y * 10 ** (gain_db / 20), -1, 1), sr, subtype="PCM_16")


def evaluate(adapter: str, voices: list[str], folder: Path, pad: float = 0.0, snr: float | None = None,
             gain_db: float = 0.0) -> dict:
    """{"voices": {spec: {"correct": n, "predicted": [...]}}, "correct": n, "total": n} for the voices
    (each clip degraded first when pad / snr / gain_db are set: `degrade`)."""
    from audio.predict import frontend_config, iter_predict
    from shared import peft
    from shared.hub import resolve_adapter

    bundle = resolve_adapter(adapter)
    cfg = frontend_config(peft.read_meta(bundle))
    model = peft.from_bundle(bundle).eval()
    rows, correct, total = {}, 0, 0
    for spec in voices:
        files = synthesise(spec, folder)
        if pad or snr is not None or gain_db:
            for i, f in enumerate(files):
                degrade(f, pad, snr, gain_db, seed=i)
        got = []
        for name, top in iter_predict(model, cfg, [str(f) for f in files], top_k=1, workers=0):
            got.append((Path(name.split(" [")[0]).stem.rsplit("_", 1)[1], top[0][0], round(top[0][1], 4), name))
        # a file longer than the window gives one answer per window: the word counts as right only if all are
        words = {}
        for want, label, p, name in got:
            words.setdefault(want, []).append(label == want)
        n = sum(all(v) for v in words.values())
        rows[spec] = {"correct": n, "predicted": [{"word": w, "label": lab, "p": p, "file": Path(nm).name}
                                                  for w, lab, p, nm in got]}
        correct, total = correct + n, total + len(WORDS)
    return {"adapter": adapter, "voices": rows, "correct": correct, "total": total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=ADAPTER, help=f"bundle reference (default: the catalogue's {ADAPTER})")
    ap.add_argument("--voices", nargs="+", metavar="VOICE[:SPEED[:PITCH]]",
                    help="espeak-ng voices and flite/NAME (default: ten espeak-ng voices, and four flite voices "
                         "when flite is installed)")
    ap.add_argument("--keep", metavar="DIR", help="write the clips here (default: a temporary folder, removed)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--pad", type=float, default=0.0, metavar="S", help="seconds of silence added before and after")
    ap.add_argument("--snr", type=float, default=None, metavar="DB", help="white noise over the clip at DB below it")
    ap.add_argument("--gain-db", type=float, default=0.0, metavar="DB", help="gain applied (e.g. -30: a quiet recording)")
    args = ap.parse_args(argv)
    if args.voices is None:
        args.voices = VOICES + (FLITE_VOICES if shutil.which("flite") else [])
    for spec in args.voices:
        if not spec.startswith("flite/"):
            parse_voice(spec)
    if espeak() is None and any(not v.startswith("flite/") for v in args.voices):
        print("error: espeak-ng not found; install it (Debian / Ubuntu: apt-get install -y espeak-ng)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        res = evaluate(args.adapter, args.voices, folder, args.pad, args.snr, args.gain_db)
    print(f"{'voice:speed:pitch':28s} correct  predicted (zero..nine)")
    for spec, row in res["voices"].items():
        labels = " ".join(p["label"] for p in row["predicted"])
        print(f"{spec:28s} {row['correct']:2d}/10   {labels}")
    print(f"{'all':28s} {res['correct']}/{res['total']} = {res['correct'] / res['total']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
