"""Modules that moved: importing an old path fails with one line that names the new one.

Recipes name data modules by import path (`class_path: audio.birds.synthetic.SyntheticBirdsDataModule`);
when a module moves, an old recipe must fail loudly rather than keep working through an alias that
would hide the move. A domain package installs a `MovedModules` finder for its own old paths.
"""
from __future__ import annotations

import importlib.abc
import sys


class ModuleMoved(ModuleNotFoundError):
    """An old module path; the message names the new one."""


class MovedModules(importlib.abc.MetaPathFinder):
    """Refuse imports of `old` module paths with a `ModuleMoved` that names `moves[old]`."""

    def __init__(self, moves: dict[str, str]):
        self.moves = dict(moves)

    def find_spec(self, fullname, path=None, target=None):
        new = self.moves.get(fullname)
        if new is None:
            return None
        raise ModuleMoved(f"module {fullname} moved to {new}: update the import or the recipe's class_path "
                          f"({fullname}.X -> {new}.X)", name=fullname)


def moved_in(dotted: str) -> str | None:
    """The one-line move notice for a dotted path (`audio.bird_synthetic.X`) under a moved module, or None."""
    for f in sys.meta_path:
        if isinstance(f, MovedModules):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):
                old = ".".join(parts[:i])
                if old in f.moves:
                    new = ".".join([f.moves[old], *parts[i:]])
                    return f"{dotted}: module {old} moved to {f.moves[old]} (use {new})"
    return None


def install(moves: dict[str, str]) -> None:
    """Add (once) a finder for `moves` in front of the import system."""
    for f in sys.meta_path:
        if isinstance(f, MovedModules):
            f.moves.update(moves)
            return
    sys.meta_path.insert(0, MovedModules(moves))
