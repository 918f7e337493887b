"""The zero-training row of the FSDD table: Whisper tiny.en transcribes each clip, words -> digits.

    python -m audio.whisper_digits --root ../shared/data/fsdd --takes 10 --output_dir runs/whisper_loso/baseline

Every clip goes through the full encoder-decoder (`audio.whisper.transcribe_batch`: 30 s input,
greedy, Whisper's suppressed tokens), nothing is trained. The transcription becomes a digit with
`digit_of`: the first word that names one (digits "0"-"9", the number words, "oh" / "o" for zero
and the homophones Whisper writes for an isolated digit: "to" / "too", "for" / "fore", "won",
"ate"); a transcription naming none is wrong. Accuracy is per speaker, the same held-out-speaker
unit as the trained rows: `OUTPUT_DIR/<speaker>/metrics.json` (report-compatible: trainable
parameters 0, the recipe without the speaker, so `python -m audio.report` averages them into one
row) and `transcripts.tsv` (file, digit, transcription, predicted digit).

It costs about 30x a 1 s encoder forward per clip (Whisper always reads 30 s), so `--takes N`
transcribes N seeded takes per (speaker, digit) (`audio.fsdd.take_subset`, seed `--seed`;
default 10: 100 clips per speaker); `--takes 0` transcribes every clip.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from shared.fs import atomic_write

WORD_DIGITS = {
    "zero": 0, "oh": 0, "o": 0, "one": 1, "won": 1, "two": 2, "to": 2, "too": 2, "three": 3, "four": 4, "for": 4,
    "fore": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "ate": 8, "nine": 9,
}
METHOD = "whisper transcription (no training)"
BACKBONE = "whisper-tiny-en (encoder + decoder, 30 s input, greedy)"


def digit_of(text: str) -> int | None:
    """The digit a transcription names: its first word that is a digit or a digit's word (see the
    module docstring); None when no word names one. "Eight." -> 8, "4" -> 4, "Oh!" -> 0,
    "10" -> None (a number, not a digit), "Hello" -> None."""
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        if word.isdigit():
            if len(word) == 1:
                return int(word)
            continue
        if word in WORD_DIGITS:
            return WORD_DIGITS[word]
    return None


def parse(argv: list[str] | None):
    ap = argparse.ArgumentParser(prog="python -m audio.whisper_digits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="the FSDD folder (holding recordings/)")
    ap.add_argument("--output_dir", default="runs/whisper_loso/baseline")
    ap.add_argument("--takes", type=int, default=10, help="takes per (speaker, digit); 0 = all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speakers", default=None, help="comma-separated; default every speaker")
    ap.add_argument("--batch", type=int, default=16, help="clips per encoder / decoder batch")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--weights", default="whisper-tiny-en")
    args = ap.parse_args(argv)
    if args.takes < 0 or args.batch < 1:
        ap.error("--takes must be >= 0 and --batch >= 1")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    import torch

    from audio.features import read_audio
    from audio.fsdd import recordings, take_subset
    from audio.whisper import load_asr, package_tokenizer, transcribe_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    recs = recordings(args.root)
    present = sorted({r[2] for r in recs})
    speakers = [s.strip() for s in args.speakers.split(",")] if args.speakers else present
    unknown = sorted(set(speakers) - set(present))
    if unknown:
        raise ValueError(f"--speakers {unknown} are not in {args.root} (speakers: {', '.join(present)})")
    keep = take_subset(recs, args.takes or None, args.seed)
    model, tok = load_asr(args.weights), package_tokenizer()  # errors (missing package) before any work
    total = sum(p.numel() for p in model.parameters())
    recipe = {"baseline": {"method": "whisper-transcribe-greedy", "weights": args.weights, "input_seconds": 30,
                           "takes": args.takes, "seed": args.seed, "digit_words": WORD_DIGITS}}
    out, rows = Path(args.output_dir), []
    for speaker in speakers:
        clips = [(wav, d) for wav, d, s, t in recs if s == speaker and (s, d, t) in keep]
        t0, c0 = time.time(), time.process_time()
        lines, correct = ["file\tdigit\ttranscription\tpredicted"], 0
        for i in range(0, len(clips), args.batch):
            part = clips[i:i + args.batch]
            texts = transcribe_batch([read_audio(w) for w, _ in part], model, tok)
            for (wav, d), text in zip(part, texts):
                pred = digit_of(text)
                correct += pred == d
                lines.append(f"{wav.name}\t{d}\t{text.replace(chr(9), ' ')}\t{'' if pred is None else pred}")
        row = {"run": f"{out.name}-{speaker}", "backbone": BACKBONE, "dataset": "fsdd", "fold": speaker,
               "protocol": "speaker-disjoint (1 test, 1 validation speaker)", "method": METHOD,
               "trainable_params": 0, "total_params": total, "test/acc": correct / len(clips), "test_clips": len(clips),
               "train_seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
               "config": {**recipe, "data": {"test_speakers": [speaker]}}}
        atomic_write(out / speaker / "transcripts.tsv", "\n".join(lines) + "\n")
        atomic_write(out / speaker / "metrics.json", json.dumps(row, indent=2))
        print(f"[whisper_digits] {speaker}: {correct}/{len(clips)} = {row['test/acc']:.4f} "
              f"({row['train_seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU)", flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
