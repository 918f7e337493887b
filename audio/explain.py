"""`python -m audio.explain`: "this looks like that" for a prototypical probe (code: `audio.birds.explain`)."""
import sys

from audio.birds.explain import main
from shared.cli import friendly

if __name__ == "__main__":
    sys.exit(friendly(main))
