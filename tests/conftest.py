"""Shared test fixtures: tiny random backbones, matching inputs, a token-forward helper, seeding."""
from __future__ import annotations

import importlib
import inspect
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

# Tiny models gain nothing from intra-op threads, and OpenMP threads that spin while another
# process holds the cores make every step 100x slower; one thread keeps the suite fast and stable.
torch.set_num_threads(1)

# anatomy name -> (registered backbone, kwargs)
BACKBONES = {
    "vit": ("tiny-vit", {}),
    "vit_reg": ("tiny-vit", {"reg_tokens": 4}),
    "ast": ("tiny-ast", {}),
    "swin": ("tiny-swin", {}),
    "llama": ("tiny-llama", {}),
    "bert": ("tiny-bert", {}),
    "whisper": ("tiny-whisper", {}),
}


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_backbone(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random backbone in eval mode; the same (name, seed) always gives the same weights."""
    from shared import backbones

    arch, kwargs = BACKBONES[name]
    if arch not in backbones.BACKBONES and arch in backbones.LAZY:  # registered by a domain package
        importlib.import_module(backbones.LAZY[arch])
    seed_all(seed)
    if "seed" in inspect.signature(backbones.BACKBONES[arch], follow_wrapped=False).parameters:  # seeded constructors
        kwargs = {**kwargs, "seed": seed}
    return backbones.create(arch, **{**kwargs, **overrides}).eval()


def make_input(name: str, seed: int = 1234) -> torch.Tensor:
    """A batch of 2 matching the backbone: images (2, 3, 32, 32), AST (2, 64, 32), Whisper (2, 16, 64),
    token ids (2, 10)."""
    g = torch.Generator().manual_seed(seed)
    if name in ("vit", "vit_reg", "swin"):
        return torch.randn(2, 3, 32, 32, generator=g)
    if name == "ast":
        return torch.randn(2, 64, 32, generator=g)  # (B, time, mel)
    if name == "whisper":
        return torch.randn(2, 16, 64, generator=g)  # (B, mel, frames): 32 positions
    return torch.randint(0, 128, (2, 10), generator=g)


def tokens(model: torch.nn.Module, x) -> torch.Tensor:
    """(B, N, D) tokens after the final norm (logits for a Classifier); keeps grad and mode."""
    from shared.backbones import anatomy
    from shared.peft import Classifier

    if isinstance(model, Classifier):
        return model(x)
    return anatomy(model).forward_tokens(x).x


def forward(model: torch.nn.Module, x) -> torch.Tensor:
    """Eval-mode, no-grad `tokens`."""
    model.eval()
    with torch.no_grad():
        return tokens(model, x)


@pytest.fixture(autouse=True)
def _seed():
    seed_all(0)
    yield


def run_threads(work, n: int) -> None:
    """Run work(0) .. work(n - 1) in n threads at once (released together by a barrier) and fail
    with every exception a thread raised."""
    import threading

    errors, barrier = [], threading.Barrier(n)

    def run(i):
        try:
            barrier.wait()
            work(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


@pytest.fixture
def tiny():
    """The helpers above, as a fixture (test modules cannot import a conftest by name: there are several)."""
    return SimpleNamespace(names=tuple(BACKBONES), backbone=make_backbone, input=make_input,
                           forward=forward, tokens=tokens, threads=run_threads)
