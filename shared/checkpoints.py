"""Where pretrained checkpoints come from, shared by every domain's backbone loader.

- `CheckpointUnavailable`: a checkpoint is neither on disk nor downloadable now; the message is one
  line that names the checkpoint and what to do;
- `hub_reachable()`: whether the Hugging Face hub can be asked at all (offline mode, no network).
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


class CheckpointUnavailable(ValueError):
    """A pretrained checkpoint is neither on disk nor downloadable now (one line, names the checkpoint)."""


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is on (HF_HUB_OFFLINE) or the hub's host cannot be reached within `timeout` s."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False
