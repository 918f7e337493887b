"""`python -m audio.probe`: the bioacoustic application's probe runner (code: `audio.birds.probe`)."""
import sys

from audio.birds.probe import main
from shared.cli import friendly

if __name__ == "__main__":
    sys.exit(friendly(main))
