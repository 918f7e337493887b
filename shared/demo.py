"""`python -m shared.demo`: the core's offline demo (tiny random AST, synthetic spectrograms)."""
import sys
from pathlib import Path

from shared.cli import friendly, main

DEFAULT = Path(__file__).resolve().parent.parent / "domains" / "demo.yaml"

if __name__ == "__main__":
    print("demo: a small AST with RANDOM weights on synthetic spectrograms (no download, no real data)")
    sys.exit(friendly(main, default_config=DEFAULT))
