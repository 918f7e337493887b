"""`--resume` for the training loops that are not Lightning's: the probe runners (`audio.probe`,
`medical.probe`) and `text.personalise`.

A `LoopCheckpoint` keeps `last.ckpt` in the run's staging folder (`shared.lifecycle.OutputRun`) after
every unit of work (an epoch of the probes, a baseline / the shared adapter / one reader's adapter of
`text.personalise`): the loop's own state (heads, optimizer, scheduler, data-order generator, what is
done), the random generators' states (torch, CUDA, numpy, python: `shared.cli.RngState`) and the
run's recipe. `--resume` continues a stopped run from it into the same output folder; the resumed run
ends with the results of an uninterrupted one. A resume with another recipe is refused in one line
that names the keys that differ (its results would be neither run's).

The file is written atomically (a stop while it is written leaves the previous one) and read with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.fs import atomic_path
from shared.lifecycle import LAST, OutputRun

FORMAT = 1


def _plain(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as JSON values (paths, tuples and numbers compared as they would be written)."""
    return json.loads(json.dumps(recipe, sort_keys=True, default=str))


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k} ({y!r} in the stopped run, {x!r} now)")
    return out


class LoopCheckpoint:
    """The `last.ckpt` of a hand-written loop, in `claim`'s staging folder.

    `kind` names the loop (a checkpoint of another CLI is refused); `recipe` is what must be the same
    for a resume to continue the stopped run (everything but where it writes)."""

    def __init__(self, claim: OutputRun, kind: str, recipe: dict[str, Any]):
        self.claim, self.kind, self.recipe = claim, kind, _plain(recipe)
        self.units = 0  # units saved by this process

    @property
    def path(self) -> Path:
        return Path(self.claim.stage) / LAST

    def load(self) -> dict[str, Any] | None:
        """The stopped run's loop state when this run resumes one (the random generators are put back as
        they were when it was saved), else None."""
        src = self.claim.resume_from
        if src is None or not Path(src).is_file():
            return None
        try:
            saved = torch.load(src, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  a damaged or foreign file: one line, the folder kept
            raise ValueError(f"{src}: cannot be read as a {self.kind} checkpoint ({type(e).__name__}: {e}); "
                             f"run without --resume to start afresh") from None
        if not isinstance(saved, dict) or saved.get("kind") != self.kind:
            raise ValueError(f"{src}: not a {self.kind} checkpoint (it was written by "
                             f"{saved.get('kind') if isinstance(saved, dict) else 'something else'}); "
                             f"run without --resume to start afresh")
        diff = _differences(self.recipe, saved.get("recipe", {}))
        if diff:
            raise ValueError(f"{src}: --resume needs the stopped run's recipe; these differ: {'; '.join(diff[:4])}"
                             + (f" and {len(diff) - 4} more" if len(diff) > 4 else ""))
        from shared.cli import RngState

        RngState().load_state_dict(saved["rng"])
        return saved["state"]

    def save(self, state: dict[str, Any]) -> None:
        """Write the loop's state after a finished unit (process 0 only; the others write nothing)."""
        if self.claim.worker or self.claim.stage is None:
            return
        from shared.cli import RngState

        payload = {"format": FORMAT, "kind": self.kind, "recipe": self.recipe, "rng": RngState().state_dict(),
                   "state": state}
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)
        self.units += 1


__all__ = ["LoopCheckpoint"]
