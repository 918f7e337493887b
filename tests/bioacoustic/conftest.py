"""Bioacoustic test helpers: where ../shared/data lives, relative to the repository."""
from pathlib import Path

import torch

torch.set_num_threads(1)  # tiny models; spinning OpenMP threads on shared cores only slow them down

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
