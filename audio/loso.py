"""`python -m audio.loso --config RECIPE ... [--KEY VALUE ...]`: one recipe, leave one speaker out.

Runs the given FSDD recipe once per speaker, in one process (the libraries and the backbone's
weights file are read once): fold i tests speaker i, validates on the next speaker in sorted
order (cyclically) and trains on the rest (`audio.fsdd.loso_folds`). Every fold is an ordinary
`audio.train` run with `--data.init_args.test_speakers [S] --data.init_args.val_speakers [V]`,
written to `OUTPUT_DIR/<test speaker>/` (`--output_dir`, default the recipe's `output_dir`), named
`<name>-<test speaker>`; `python -m audio.report OUTPUT_DIR/..` then averages the folds into one
row (their recipes differ only in the held-out speakers), mean ± population std over speakers.

    python -m audio.loso --config domains/audio/data/fsdd.yaml --config domains/audio/real/whisper_fsdd_lora.yaml \\
        --data.root ../shared/data/fsdd --output_dir runs/whisper_loso/lora

Own options (the others go to every fold): `--speakers a,b,c` (default: every speaker in the
data), `--folds theo,lucas` (only the folds testing these speakers), `--skip_done` (leave a fold
whose `metrics.json` exists: continue an interrupted loop), `--resume` (continue a loop that was
stopped: a fold with a stopped run's `last.ckpt` resumes from it, a finished fold without one is
left as it is, the others run). Exit status 0 when every fold ran.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shared.cli import arg_value


def split_own(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="python -m audio.loso", add_help=False)
    ap.add_argument("--speakers", default=None)
    ap.add_argument("--folds", default=None)
    ap.add_argument("--skip_done", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("-h", "--help", action="store_true")
    return ap.parse_known_args(argv)


def recipe_value(argv: list[str], key: str):
    """A recipe key (dotted) as the --config files and flags given set it (the last one wins)."""
    import yaml

    flag = arg_value(argv, f"--{key}", f"--{key.replace('init_args.', '')}")
    if flag is not None:
        return flag
    value = None
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    for f in files:
        node = yaml.safe_load(Path(f).read_text()) or {}
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            value = node
    return value


def stopped_run(fold_dir: Path) -> bool:
    """Whether a stopped `audio.train` run of this fold left a checkpoint that `--resume` continues."""
    from shared.lifecycle import LAST, staging_folders

    return any((stage / LAST).is_file() for stage in staging_folders(fold_dir))


def plan(argv: list[str], speakers: str | None, folds: str | None) -> list[tuple[str, str]]:
    from audio.fsdd import loso_folds, recordings

    if speakers:
        chosen = [s.strip() for s in speakers.split(",") if s.strip()]
    else:
        root = recipe_value(argv, "data.init_args.root")
        if not root:
            raise ValueError("audio.loso: set --data.root to the FSDD folder (the one holding recordings/)")
        chosen = sorted({r[2] for r in recordings(root)})
    pairs = loso_folds(chosen)
    if folds:
        wanted = [s.strip() for s in folds.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {t for t, _ in pairs})
        if unknown:
            raise ValueError(f"audio.loso: --folds {unknown} are not speakers of the rotation ({', '.join(chosen)})")
        pairs = [p for p in pairs if p[0] in wanted]
    return pairs


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = split_own(argv)
    if own.help:
        print(__doc__)
        return []
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        raise ValueError("audio.loso: give the recipes with --config (e.g. domains/audio/data/fsdd.yaml and "
                         "domains/audio/real/whisper_fsdd_lora.yaml)")
    rest = [a for pair in ((a.split("=", 1) if a.startswith("--config=") else [a]) for a in rest) for a in pair]
    pairs = plan(rest, own.speakers, own.folds)
    out = Path(arg_value(rest, "--output_dir") or recipe_value(rest, "output_dir") or "runs/loso")
    name = arg_value(rest, "--run_name") or out.name
    base = [a for i, a in enumerate(rest) if a not in ("--output_dir", "--run_name")
            and (i == 0 or rest[i - 1] not in ("--output_dir", "--run_name"))
            and not a.startswith(("--output_dir=", "--run_name="))]
    from audio.train import main as train

    rows = []
    print(f"[loso] {len(pairs)} folds (test, validation): {pairs} -> {out}/<test speaker>", flush=True)
    for test, val in pairs:
        fold_dir = out / test
        stopped = own.resume and stopped_run(fold_dir)
        if (own.skip_done or own.resume) and not stopped and (fold_dir / "metrics.json").is_file():
            print(f"[loso] fold {test}: done before ({fold_dir / 'metrics.json'}), skipped", flush=True)
            continue
        t0, c0 = time.time(), time.process_time()
        print(f"[loso] fold {test}: test {test}, validation {val}", flush=True)
        row = train(base + ["--data.init_args.test_speakers", f"[{test}]", "--data.init_args.val_speakers", f"[{val}]",
                            "--output_dir", str(fold_dir), "--run_name", f"{name}-{test}"]
                    + (["--resume"] if stopped else []))
        acc = row.get("test/acc")
        print(f"[loso] fold {test}: test/acc {acc if acc is None else round(acc, 4)}, "
              f"{time.time() - t0:.0f} s wall, {time.process_time() - c0:.0f} s CPU", flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    from shared.cli import friendly

    sys.exit(friendly(main))
