"""`python -m shared.demo`: the core's offline demo (tiny random AST, synthetic spectrograms)."""
from pathlib import Path

from shared.cli import main

DEFAULT = Path(__file__).resolve().parent.parent / "domains" / "demo.yaml"

if __name__ == "__main__":
    print("demo: a small AST with RANDOM weights on synthetic spectrograms (no download, no real data)")
    main(default_config=DEFAULT)
